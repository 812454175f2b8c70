"""`data.name: hf`: local documents, tokenized once into a cached flat token array.

The documents (jsonl, json, parquet, txt, or a saved `datasets` directory) are read with
`datasets` in streaming mode (or memory-mapped, for a saved directory), so a corpus larger
than memory works and nothing is downloaded. Each document is encoded and followed by the
tokenizer's end-of-text token, then appended to `train.bin` or `val.bin`. A document goes to
validation when a hash of its text falls below `data.val_fraction` (as the built-in corpus
splits by a hash of each file's path): whole documents, the same split on every machine and in
any file order, and a duplicated document never lands on both sides.

The token files are cached under a key hashing (files, sizes, mtimes, field, tokenizer,
val_fraction), written to a temporary directory and renamed into place, so a second run, or
another island on the same disk, reads them memory-mapped at once. Training then reuses
`TokenWindows`: contiguous disjoint shards per island, seeded random windows, a resumable
generator, and the same validation windows on every island.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from diloco.data.base import DataSource
from diloco.data.hf_config import KEY, HfDataConfig
from diloco.data.hf_tokenizer import TextTokenizer, load_tokenizer
from diloco.data.noise import NoisyWindows
from diloco.data.windows import TokenWindows
from diloco.errors import ConfigError
from diloco.extras import require_extra

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped when the cached files' layout changes, so that old caches are not read."""
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
"""File suffix (before an optional .gz) -> the `datasets` builder that reads it."""
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
"""Files of a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
DOCUMENTS_PER_BATCH = 1_000
FLUSH_TOKENS = 1 << 20


class HfDataSettings(Protocol):
    """The fields of the `data` section this source reads (DataConfig has them)."""

    batch_size: int
    seq_len: int
    val_fraction: float
    noise: float
    hf: HfDataConfig


@dataclass(frozen=True)
class TokenSplits:
    """The cached token arrays (memory-mapped) and what they hold."""

    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    """Counts (documents, tokens per split), the separator id, dtype, and the sources."""


def build_hf_sources(
    data: HfDataSettings,
    *,
    islands: Sequence[int],
    num_islands: int,
    seed: int,
    vocab_size: int,
    cache_dir: Path,
) -> list[DataSource]:
    """One `TokenWindows` per island in `islands` over the tokenized documents.

    Args:
        data: the data section (batch_size, seq_len, val_fraction, noise, hf).
        islands: the islands this process hosts; num_islands: how many share the data.
        seed: the run's seed.
        vocab_size: the model's vocabulary; the tokenizer's must not be larger.
        cache_dir: where tokenized files are cached (shared by runs on the same data).

    Raises:
        ConfigError: no file matches, a file is empty or unreadable, the field is missing,
            the tokenizer does not fit the model, or a split is too small for one window.
    """
    data.hf.require()
    tokenizer = load_tokenizer(data.hf.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"{KEY}.tokenizer: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocabulary of {vocab_size} (model.vocab_size, or vocab_size in model.hf)"
        )
    splits = tokenize_documents(data.hf, tokenizer, data.val_fraction, cache_dir)
    try:
        sources: list[DataSource] = [
            TokenWindows(
                splits.train,
                splits.val,
                batch_size=data.batch_size,
                seq_len=data.seq_len,
                island=island,
                num_islands=num_islands,
                seed=seed,
                vocab_size=vocab_size,
            )
            for island in islands
        ]
    except ValueError as error:
        raise ConfigError(f"data: {error}") from None
    if data.noise == 0:
        return sources
    return [
        NoisyWindows(source, noise=data.noise, vocab_size=vocab_size, seed=seed, island=island)
        for source, island in zip(sources, islands, strict=True)
    ]


def tokenize_documents(
    hf: HfDataConfig, tokenizer: TextTokenizer, val_fraction: float, cache_dir: Path
) -> TokenSplits:
    """The (train, val) token arrays of `hf.files`, from the cache or tokenized now.

    Raises:
        ConfigError: see `build_hf_sources`.
    """
    source = resolve_files(hf.files)
    key = _cache_key(source, hf.field, tokenizer, val_fraction)
    directory = cache_dir / key[:20]
    if not (directory / "meta.json").is_file():
        _write_cache(directory, source, hf.field, tokenizer, val_fraction)
    else:
        log.info("tokens of %s from the cache %s", hf.files, directory)
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return TokenSplits(
        train=np.memmap(directory / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(directory / "val.bin", dtype=dtype, mode="r"),
        meta=meta,
    )


@dataclass(frozen=True)
class DocumentSource:
    """Where the documents are: files of one format, or a saved datasets directory."""

    builder: str
    """A datasets builder (json, parquet, text), or "saved" for save_to_disk's output."""
    paths: tuple[Path, ...]
    """The files, sorted (for "saved": the directory)."""


def resolve_files(pattern: str) -> DocumentSource:
    """The documents `data.hf.files` names.

    Raises:
        ConfigError: nothing matches, a format is unknown or mixed, or a file is empty.
    """
    location = Path(pattern)
    if location.is_dir():
        if any((location / marker).is_file() for marker in SAVED_MARKERS):
            return DocumentSource("saved", (location,))
        raise ConfigError(
            f"{KEY}.files: directory {pattern!r} is not a saved datasets directory (no "
            f"{' or '.join(SAVED_MARKERS)}); give a glob such as {pattern.rstrip('/')}/*.jsonl"
        )
    paths = sorted(Path(path) for path in glob.glob(pattern, recursive=True))
    paths = [path for path in paths if path.is_file()]
    if not paths:
        raise ConfigError(f"{KEY}.files: no file matches {pattern!r}")
    builders = {_builder(path) for path in paths}
    if len(builders) > 1:
        raise ConfigError(
            f"{KEY}.files: {pattern!r} matches files of several formats ({sorted(builders)}); "
            "use one format per run"
        )
    for path in paths:
        if path.stat().st_size == 0:
            raise ConfigError(f"{KEY}.files: {path} is empty")
    return DocumentSource(builders.pop(), tuple(paths))


def _builder(path: Path) -> str:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    suffix = suffixes[0] if suffixes else ""
    if suffix not in BUILDERS:
        raise ConfigError(
            f"{KEY}.files: {path} has an unknown format; expected one of "
            f"{', '.join(BUILDERS)} (optionally .gz), or a saved datasets directory"
        )
    return BUILDERS[suffix]


def _cache_key(
    source: DocumentSource, field: str, tokenizer: TextTokenizer, val_fraction: float
) -> str:
    files = list(source.paths) if source.builder != "saved" else sorted(source.paths[0].rglob("*"))
    stats = [
        (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
        for path in files
        if path.is_file()
    ]
    described = {
        "format": CACHE_FORMAT,
        "builder": source.builder,
        "files": stats,
        "field": field,
        "tokenizer": tokenizer.fingerprint,
        "val_fraction": val_fraction,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _write_cache(
    directory: Path,
    source: DocumentSource,
    field: str,
    tokenizer: TextTokenizer,
    val_fraction: float,
) -> None:
    """Tokenize into a temporary directory beside `directory`, then rename it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        with open(temporary / "train.bin", "wb") as train, open(temporary / "val.bin", "wb") as val:
            documents = read_documents(source, field, directory.parent)
            counts = _pack(documents, tokenizer, val_fraction, (train, val), dtype)
        _check_counts(counts, val_fraction)
        meta = {
            **counts,
            "dtype": np.dtype(dtype).name,
            "separator_id": tokenizer.separator_id,
            "vocab_size": tokenizer.vocab_size,
            "files": [str(path) for path in source.paths],
        }
        (temporary / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(temporary, directory)
        except OSError:  # another process got there first: its files are the same
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    log.info("tokenized %s into %s: %s", source.paths[0], directory, counts)


def _pack(
    documents: Iterator[list[str]],
    tokenizer: TextTokenizer,
    val_fraction: float,
    outputs: tuple[BinaryIO, BinaryIO],
    dtype: type[np.unsignedinteger[Any]],
) -> dict[str, int]:
    """Write every document's ids and a separator to the train or val file; returns counts."""
    buffers: tuple[list[int], list[int]] = ([], [])
    counts = {"train_documents": 0, "val_documents": 0, "train_tokens": 0, "val_tokens": 0}
    threshold = val_fraction * 10_000
    for texts in documents:
        kept = [text for text in texts if text]
        for text, ids in zip(kept, tokenizer.encode_batch(kept), strict=True):
            held_out = zlib.crc32(text.encode("utf-8", "surrogatepass")) % 10_000 < threshold
            side = "val" if held_out else "train"
            buffer = buffers[int(held_out)]
            buffer.extend(ids)
            buffer.append(tokenizer.separator_id)
            counts[f"{side}_documents"] += 1
            counts[f"{side}_tokens"] += len(ids) + 1
        for buffer, output in zip(buffers, outputs, strict=True):
            if len(buffer) >= FLUSH_TOKENS:
                np.asarray(buffer, dtype=dtype).tofile(output)
                buffer.clear()
    for buffer, output in zip(buffers, outputs, strict=True):
        np.asarray(buffer, dtype=dtype).tofile(output)
    return counts


def _check_counts(counts: dict[str, int], val_fraction: float) -> None:
    documents = counts["train_documents"] + counts["val_documents"]
    if documents == 0:
        raise ConfigError(f"{KEY}.files: the files hold no text in {KEY}.field")
    for side in ("train", "val"):
        if counts[f"{side}_documents"] == 0:
            raise ConfigError(
                f"data.val_fraction={val_fraction} leaves the {side} split of the {documents} "
                f"documents of {KEY}.files empty; change it or add documents"
            )


def read_documents(source: DocumentSource, field: str, cache_dir: Path) -> Iterator[list[str]]:
    """Batches of the documents' texts, in file order (missing values are skipped).

    Raises:
        ConfigError: the field is missing or not text, or a file cannot be parsed.
    """
    datasets = require_extra("datasets", key=f"{KEY}.files", extra="hf")
    try:
        if source.builder == "saved":
            dataset = _saved_dataset(datasets, source.paths[0])
        else:
            options = {"sample_by": "paragraph"} if source.builder == "text" else {}
            dataset = datasets.load_dataset(
                source.builder,
                data_files=[str(path) for path in source.paths],
                split="train",
                streaming=True,
                cache_dir=str(cache_dir / "datasets"),
                **options,
            )
        _check_field(dataset.column_names, field, source)
        for batch in dataset.select_columns([field]).iter(batch_size=DOCUMENTS_PER_BATCH):
            yield _texts(batch[field], field)
    except ConfigError:
        raise
    except Exception as error:  # arrow, json and datasets errors all mean an unreadable file
        raise ConfigError(
            f"{KEY}.files: cannot read {source.paths[0]}: {_first_line(error)}"
        ) from None


def _saved_dataset(datasets: Any, directory: Path) -> Any:
    loaded = datasets.load_from_disk(str(directory))
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ConfigError(
        f"{KEY}.files: {directory} holds the splits {sorted(loaded)}; expected a train split"
    )


def _check_field(columns: Sequence[str] | None, field: str, source: DocumentSource) -> None:
    if columns is not None and field not in columns:
        raise ConfigError(
            f"{KEY}.field: {source.paths[0]} has no field {field!r}; its fields are "
            f"{', '.join(map(repr, columns))}"
        )


def _texts(values: list[Any], field: str) -> list[str]:
    wrong = next((value for value in values if not isinstance(value, (str, type(None)))), None)
    if wrong is not None:
        raise ConfigError(
            f"{KEY}.field: {field!r} holds {type(wrong).__name__} values, expected text"
        )
    return [value for value in values if value]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
