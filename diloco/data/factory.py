"""Build each hosted island's data source from the `data` config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diloco.data.base import DataSource
from diloco.data.config import DataConfig
from diloco.data.corpus import load_stdlib_corpus
from diloco.data.noise import NoisyWindows
from diloco.data.token_files import read_text_tokens, read_token_file, split_tail
from diloco.data.windows import TokenWindows
from diloco.errors import ConfigError, existing_file
from diloco.resolve import call_factory


def build_data_sources(
    config: DataConfig,
    *,
    islands: Sequence[int],
    num_islands: int,
    seed: int,
    vocab_size: int,
    cache_dir: Path | None = None,
) -> list[DataSource]:
    """One data source per island in `islands` (the files are read once and shared).

    `cache_dir` holds data.name hf's tokenized documents (shared by a run's islands).

    Raises:
        ConfigError: a named file is missing or unreadable, or a factory is not importable.
    """
    if config.name == "hf":
        from diloco.data.hf_text import build_hf_sources

        return build_hf_sources(
            config,
            islands=islands,
            num_islands=num_islands,
            seed=seed,
            vocab_size=vocab_size,
            cache_dir=cache_dir if cache_dir is not None else Path("token-cache"),
        )
    if ":" in config.name:
        return [_from_factory(config, island, num_islands, seed) for island in islands]
    train, val = _load_tokens(config)
    try:
        sources: list[DataSource] = [
            TokenWindows(
                train,
                val,
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                island=island,
                num_islands=num_islands,
                seed=seed,
                vocab_size=vocab_size,
            )
            for island in islands
        ]
    except ValueError as error:
        raise ConfigError(f"data: {error}") from None
    if config.noise == 0:
        return sources
    return [
        NoisyWindows(source, noise=config.noise, vocab_size=vocab_size, seed=seed, island=island)
        for source, island in zip(sources, islands, strict=True)
    ]


def _load_tokens(config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    if config.name == "stdlib":
        try:
            return load_stdlib_corpus(config.val_fraction)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data.name stdlib: {error}") from None
    read = _reader(config)
    train = read(existing_file("data.path", config.path), "data.path")
    if config.val_path:
        return train, read(existing_file("data.val_path", config.val_path), "data.val_path")
    return split_tail(train, config.val_fraction)


def _reader(config: DataConfig):  # type: ignore[no-untyped-def]
    if config.name == "text":
        return lambda path, key: read_text_tokens(path)
    dtype = config.token_dtype.value

    def read_tokens(path: Path, key: str) -> np.ndarray:
        try:
            return read_token_file(path, dtype)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None

    return read_tokens


def _from_factory(config: DataConfig, island: int, num_islands: int, seed: int) -> DataSource:
    given = {
        "island": island,
        "num_islands": num_islands,
        "seed": seed,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
    }
    source = call_factory(
        config.name, "data.name", args=config.args, args_key="data.args", given=given
    )
    # The runtime calls all four: state_dict at every checkpoint, load_state_dict on resume.
    methods = ("next_batch", "val_batches", "state_dict", "load_state_dict")
    missing = [m for m in methods if not callable(getattr(source, m, None))]
    if missing:
        raise ConfigError(
            f"data.name: {config.name!r} returned {type(source).__name__}, which lacks "
            f"{', '.join(missing)} (see docs/plugins.md)"
        )
    return source  # type: ignore[no-any-return]
