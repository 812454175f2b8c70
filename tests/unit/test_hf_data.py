"""data.name hf: packing, the document split, shards, resume, the cache, formats and refusals."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason='needs the hf extra: pip install -e ".[hf]"')
pytest.importorskip("tokenizers", reason='needs the hf extra: pip install -e ".[hf]"')

import numpy as np
import tokenizers
import torch

from diloco.data import hf_text
from diloco.data.hf_config import HfDataConfig
from diloco.data.hf_text import build_hf_sources, tokenize_documents
from diloco.data.hf_tokenizer import load_tokenizer
from diloco.data.windows import TokenWindows
from diloco.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_tokenizer.py"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "mu"]
SEQ_LEN, VAL_FRACTION = 8, 0.2


@dataclass
class Data:
    """The data section fields the source reads (DataConfig has them)."""

    hf: HfDataConfig
    batch_size: int = 4
    seq_len: int = SEQ_LEN
    val_fraction: float = VAL_FRACTION
    noise: float = 0.0


def documents(count: int = 80) -> list[str]:
    """Distinct documents of a few words each."""
    return [
        f"doc {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9))
        for i in range(count)
    ]


def write_tokenizer(path: Path, texts: list[str], special: str = "<|endoftext|>") -> Path:
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[special],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path))
    return path


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: text, "n": i}) + "\n" for i, text in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jsonl of documents, its tokenizer, and a tokenized cache, shared by the tests."""
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "docs.jsonl", documents())
    write_tokenizer(root / "tokenizer.json", documents())
    build(config(root), root)  # tokenize once (the first datasets call is the slow one)
    return root


def config(root: Path) -> Data:
    """The corpus's data section (its tokens are cached under root/cache)."""
    return Data(
        HfDataConfig(files=str(root / "docs.jsonl"), tokenizer=str(root / "tokenizer.json"))
    )


def build(
    data: Data, root: Path, islands: tuple[int, ...] = (0, 1), vocab: int = 300
) -> list[TokenWindows]:
    sources = build_hf_sources(
        data, islands=islands, num_islands=2, seed=7, vocab_size=vocab, cache_dir=root / "cache"
    )
    assert all(isinstance(s, TokenWindows) for s in sources)
    return sources  # type: ignore[return-value]


def split_documents(tokens: np.ndarray, separator: int) -> list[tuple[int, ...]]:
    ends = np.flatnonzero(tokens == separator)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tuple(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def test_documents_are_packed_with_a_separator_after_each(corpus: Path) -> None:
    """train + val hold every document's ids, each followed by the end-of-text id, once."""
    tokenizer = load_tokenizer(str(corpus / "tokenizer.json"))
    splits = tokenize_documents(config(corpus).hf, tokenizer, VAL_FRACTION, corpus / "cache")
    separator = tokenizer.separator_id
    assert separator == 0 and splits.train[-1] == separator and splits.val[-1] == separator
    packed = split_documents(np.asarray(splits.train), separator)
    packed += split_documents(np.asarray(splits.val), separator)
    expected = [tuple(ids) for ids in tokenizer.encode_batch(documents())]
    assert sorted(packed) == sorted(expected)
    assert splits.meta["train_documents"] + splits.meta["val_documents"] == len(documents())


def test_validation_holds_whole_documents_none_of_them_trained_on(corpus: Path) -> None:
    tokenizer = load_tokenizer(str(corpus / "tokenizer.json"))
    splits = tokenize_documents(config(corpus).hf, tokenizer, VAL_FRACTION, corpus / "cache")
    train = set(split_documents(np.asarray(splits.train), 0))
    val = set(split_documents(np.asarray(splits.val), 0))
    assert val and train and not train & val
    assert 0.05 < len(val) / (len(val) + len(train)) < 0.4  # about val_fraction of 80 documents


def test_shards_are_disjoint_contiguous_and_cover_the_training_tokens(corpus: Path) -> None:
    first, second = build(config(corpus), corpus)
    tokenizer = load_tokenizer(str(corpus / "tokenizer.json"))
    train = tokenize_documents(config(corpus).hf, tokenizer, VAL_FRACTION, corpus / "cache").train
    assert np.array_equal(np.concatenate([first.shard, second.shard]), train)
    assert len(first.shard) > 10 * (SEQ_LEN + 1)
    assert np.array_equal(first.val, second.val)  # the same validation on every island


def test_streams_are_deterministic_for_a_seed_and_differ_by_island(corpus: Path) -> None:
    one = [s.next_batch().inputs for s in build(config(corpus), corpus) for _ in range(3)]
    two = [s.next_batch().inputs for s in build(config(corpus), corpus) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert not torch.equal(one[0], one[3])
    batch = build(config(corpus), corpus)[0].next_batch()
    assert batch.inputs.shape == (4, SEQ_LEN + 1) and batch.num_tokens == 4 * SEQ_LEN


def test_resume_continues_the_same_stream(corpus: Path) -> None:
    source = build(config(corpus), corpus, islands=(1,))[0]
    for _ in range(3):
        source.next_batch()
    state = source.state_dict()
    expected = [source.next_batch().inputs for _ in range(3)]
    resumed = build(config(corpus), corpus, islands=(1,))[0]
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch().inputs, e) for e in expected)


def test_the_cache_is_reused_and_follows_the_files(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = config(corpus)  # cached by the fixture
    calls = []
    real_write = hf_text._write_cache
    monkeypatch.setattr(hf_text, "_write_cache", lambda *a: calls.append(a) or real_write(*a))
    build(data, corpus)
    assert calls == []
    changed = tmp_path / "docs.jsonl"
    write_jsonl(changed, documents(60))
    build(Data(HfDataConfig(files=str(changed), tokenizer=data.hf.tokenizer)), corpus)
    assert len(calls) == 1


def test_parquet_gzip_and_a_saved_dataset_pack_like_jsonl(corpus: Path, tmp_path: Path) -> None:
    import datasets

    tokenizer = load_tokenizer(str(corpus / "tokenizer.json"))
    reference = tokenize_documents(config(corpus).hf, tokenizer, VAL_FRACTION, corpus / "cache")
    table = datasets.Dataset.from_dict({"body": documents()})
    table.to_parquet(str(tmp_path / "docs.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    lines = "".join(json.dumps({"body": text}) + "\n" for text in documents())
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "docs.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    for files in (str(tmp_path / "*.parquet"), str(tmp_path / "saved"), str(tmp_path / "gz/*")):
        hf = HfDataConfig(files=files, field="body", tokenizer=str(corpus / "tokenizer.json"))
        splits = tokenize_documents(hf, tokenizer, VAL_FRACTION, tmp_path / "cache")
        assert np.array_equal(splits.train, reference.train), files
        assert np.array_equal(splits.val, reference.val), files


def test_a_text_file_is_one_document_per_paragraph(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_text("\n\n".join(documents()) + "\n")
    tokenizer = load_tokenizer(str(corpus / "tokenizer.json"))
    hf = HfDataConfig(files=str(tmp_path / "book.txt"), tokenizer=str(corpus / "tokenizer.json"))
    splits = tokenize_documents(hf, tokenizer, VAL_FRACTION, tmp_path / "cache")
    assert splits.meta["train_documents"] + splits.meta["val_documents"] == len(documents())


def test_a_tokenizer_directory_loads_through_auto_tokenizer(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason='needs the hf extra: pip install -e ".[hf]"')
    (tmp_path / "tokenizer.json").write_bytes((corpus / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    )
    from_file = load_tokenizer(str(corpus / "tokenizer.json"))
    from_directory = load_tokenizer(str(tmp_path))
    assert from_directory.separator_id == from_file.separator_id == 0
    assert from_directory.encode_batch(documents()[:5]) == from_file.encode_batch(documents()[:5])


def refusal(data: Data, root: Path, vocab: int = 300) -> str:
    with pytest.raises(ConfigError) as caught:
        build(data, root, vocab=vocab)
    message = str(caught.value)
    assert "\n" not in message
    return message


def hf(root: Path, files: str, tokenizer: str = "tokenizer.json", field: str = "text") -> Data:
    return Data(HfDataConfig(files=files, tokenizer=str(root / tokenizer), field=field))


def test_refuses_a_glob_that_matches_nothing(corpus: Path) -> None:
    message = refusal(hf(corpus, str(corpus / "nothing-*.jsonl")), corpus)
    assert message.startswith("data.hf.files: no file matches") and "nothing-*" in message


def test_refuses_an_empty_file(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    message = refusal(hf(corpus, str(tmp_path / "empty.jsonl")), corpus)
    assert message.startswith("data.hf.files:") and "empty" in message


def test_refuses_a_missing_field_naming_the_fields_there(corpus: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "docs.jsonl", documents(), key="content")
    message = refusal(hf(corpus, str(tmp_path / "docs.jsonl")), corpus)
    assert message.startswith("data.hf.field:") and "'text'" in message
    assert "'content'" in message and "'n'" in message


def test_refuses_a_field_that_is_not_text(corpus: Path) -> None:
    message = refusal(hf(corpus, str(corpus / "docs.jsonl"), field="n"), corpus)
    assert message.startswith("data.hf.field:") and "int" in message


def test_refuses_a_tokenizer_larger_than_the_model(corpus: Path) -> None:
    message = refusal(hf(corpus, str(corpus / "docs.jsonl")), corpus, vocab=256)
    assert message.startswith("data.hf.tokenizer:") and "300" in message and "256" in message


def test_refuses_a_tokenizer_without_end_of_text(corpus: Path, tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "tokenizer.json", documents(), special="<pad>")
    data = Data(
        HfDataConfig(files=str(corpus / "docs.jsonl"), tokenizer=str(tmp_path / "tokenizer.json"))
    )
    message = refusal(data, corpus)
    assert message.startswith("data.hf.tokenizer:") and "end-of-text" in message


def test_refuses_unreadable_and_unknown_inputs(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("not a tokenizer")
    bad_tokenizer = hf(corpus, str(corpus / "docs.jsonl"), tokenizer=str(tmp_path / "bad.json"))
    assert refusal(bad_tokenizer, corpus).startswith("data.hf.tokenizer:")
    (tmp_path / "docs.csv").write_text("text\nhello\n")
    assert "unknown format" in refusal(hf(corpus, str(tmp_path / "docs.csv")), corpus)
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    message = refusal(hf(corpus, str(tmp_path / "broken.jsonl")), corpus)
    assert message.startswith("data.hf.files: cannot read")
    assert "saved datasets directory" in refusal(hf(corpus, str(tmp_path)), corpus)


def test_refuses_a_split_left_empty(corpus: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "two.jsonl", documents(2))
    data = hf(corpus, str(tmp_path / "two.jsonl"))
    data.val_fraction = 0.0001
    assert refusal(data, corpus).startswith("data.val_fraction=0.0001 leaves the val split")


def test_section_checks() -> None:
    with pytest.raises(ConfigError, match=r"^data.hf.field must name"):
        HfDataConfig(field="")
    with pytest.raises(ConfigError, match=r"^data.name hf needs data.hf.files"):
        HfDataConfig(tokenizer="t.json").require()
    with pytest.raises(ConfigError, match=r"^data.name hf needs data.hf.tokenizer"):
        HfDataConfig(files="d.jsonl").require()


def test_the_tokenizer_example_trains_in_seconds(tmp_path: Path) -> None:
    """examples/train_tokenizer.py on a tiny input: a loadable tokenizer and a jsonl corpus."""
    write_jsonl(tmp_path / "mine.jsonl", documents())
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--files",
            str(tmp_path / "mine.jsonl"),
            "--vocab-size",
            "280",
            "--out",
            str(tmp_path / "tokenizer"),
            "--write-jsonl",
            str(tmp_path / "stdlib.jsonl"),
            "--max-mb",
            "0.05",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 60
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer" / "tokenizer.json"))
    assert tokenizer.vocab_size == 280 and tokenizer.separator_id == 0
    rows = [json.loads(line) for line in (tmp_path / "stdlib.jsonl").read_text().splitlines()]
    assert rows and all(
        isinstance(row["text"], str) and row["path"].endswith(".py") for row in rows
    )
