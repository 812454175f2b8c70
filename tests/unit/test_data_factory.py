"""build_data_sources: one data source per hosted island, from the `data` config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diloco.data import Batch, TokenWindows, build_data_sources
from diloco.data.config import DataConfig, TokenDtype
from diloco.errors import ConfigError


class TinySource:
    """A user data source, as a `module:factory` would return it."""

    def __init__(
        self, *, island: int, num_islands: int, seed: int, batch_size: int, seq_len: int, fill: int
    ):
        self.inputs = torch.full((batch_size, seq_len + 1), fill + island + 10 * seed)
        self.num_islands = num_islands
        self.drawn = 0

    def next_batch(self) -> Batch:
        self.drawn += 1
        return Batch(self.inputs, self.inputs.numel())

    def val_batches(self, count: int) -> list[Batch]:
        return [Batch(self.inputs, self.inputs.numel())] * count

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = state["drawn"]


def tiny_source(**kwargs: Any) -> TinySource:
    return TinySource(**kwargs)


class Stateless:
    """Has next_batch and val_batches but no state: a checkpoint could not save it."""

    def next_batch(self) -> Batch:
        return Batch(torch.zeros(1, 2, dtype=torch.int64), 1)

    def val_batches(self, count: int) -> list[Batch]:
        return []


def not_a_source(**kwargs: Any) -> object:
    return object()


def stateless_source(**kwargs: Any) -> Stateless:
    return Stateless()


def build(config: DataConfig, islands: tuple[int, ...] = (0, 1)) -> list[Any]:
    return build_data_sources(config, islands=islands, num_islands=2, seed=3, vocab_size=70_000)


def test_tokens_file_gives_token_windows(tmp_path: Path) -> None:
    """data.name tokens: the file's ids, split into train and the last val_fraction."""
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint32).tofile(path)
    config = DataConfig(
        name="tokens",
        path=str(path),
        token_dtype=TokenDtype.uint32,
        batch_size=2,
        seq_len=4,
        val_fraction=0.1,
    )
    sources = build(config)
    assert [type(s) for s in sources] == [TokenWindows, TokenWindows]
    assert np.array_equal(sources[1].shard, np.arange(450, 900))
    assert np.array_equal(sources[0].val, np.arange(900, 1000))
    assert sources[0].next_batch().inputs.shape == (2, 5)


def test_separate_val_file(tmp_path: Path) -> None:
    """data.val_path: validation comes from its own file and the training file is whole."""
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(500, 520, dtype=np.uint16).tofile(tmp_path / "val.bin")
    config = DataConfig(
        name="tokens",
        path=str(tmp_path / "train.bin"),
        val_path=str(tmp_path / "val.bin"),
        batch_size=2,
        seq_len=4,
    )
    (source,) = build(config, islands=(1,))
    assert np.array_equal(source.shard, np.arange(50, 100))
    assert np.array_equal(source.val, np.arange(500, 520))


def test_text_file_gives_byte_windows(tmp_path: Path) -> None:
    """data.name text: the bytes of the file are the tokens."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"def f(x):\n    return x\n" * 20)
    (source,) = build(DataConfig(name="text", path=str(path), batch_size=2, seq_len=8), (0,))
    batch = source.next_batch().inputs
    assert batch.shape == (2, 9)
    assert bytes(batch[0].tolist()) in path.read_bytes()


@pytest.mark.parametrize("name", ["text", "tokens"])
def test_missing_file_names_data_path(tmp_path: Path, name: str) -> None:
    """A missing training file is a ConfigError naming data.path and the file."""
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(ConfigError, match=r"data.path: file '.*nope.bin' does not exist"):
        build(DataConfig(name=name, path=missing))


def test_missing_val_file_names_data_val_path(tmp_path: Path) -> None:
    """A missing validation file names data.val_path."""
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    config = DataConfig(
        name="tokens", path=str(tmp_path / "train.bin"), val_path=str(tmp_path / "v.bin")
    )
    with pytest.raises(ConfigError, match=r"data.val_path: file '.*v.bin' does not exist"):
        build(config)


def test_odd_sized_token_files_name_their_key(tmp_path: Path) -> None:
    """A file that is not whole tokens of data.token_dtype names the key it came from."""
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "good.bin")
    with pytest.raises(ConfigError, match=r"^data.path: .*odd.bin has 7 bytes"):
        build(DataConfig(name="tokens", path=str(tmp_path / "odd.bin")))
    config = DataConfig(
        name="tokens", path=str(tmp_path / "good.bin"), val_path=str(tmp_path / "odd.bin")
    )
    with pytest.raises(ConfigError, match=r"^data.val_path: .*odd.bin has 7 bytes"):
        build(config)


def test_too_little_data_is_a_config_error(tmp_path: Path) -> None:
    """Shards shorter than a window surface as a ConfigError under `data`."""
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "small.bin")
    config = DataConfig(name="tokens", path=str(tmp_path / "small.bin"), seq_len=16)
    with pytest.raises(ConfigError, match=r"^data: island 0's shard has 9 tokens"):
        build(config)


def test_stdlib_without_sources_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No standard-library sources, or a split with no validation file: a ConfigError."""
    monkeypatch.setattr("diloco.data.corpus.stdlib_root", lambda: tmp_path)
    with pytest.raises(ConfigError, match="data.name stdlib: no standard-library sources"):
        build(DataConfig(name="stdlib"))
    (tmp_path / "a.py").write_text("x = 1\n")  # crc32 bucket 1502: train at 2%
    with pytest.raises(ConfigError, match="data.name stdlib: data.val_fraction=0.02 leaves"):
        build(DataConfig(name="stdlib", val_fraction=0.02))


def test_module_factory_source_gets_island_seed_and_args() -> None:
    """module:factory: called once per island with the island's keywords and data.args."""
    config = DataConfig(name=f"{__name__}:tiny_source", batch_size=2, seq_len=3, args={"fill": 5})
    sources = build(config)
    assert [type(s) for s in sources] == [TinySource, TinySource]
    assert torch.equal(sources[0].next_batch().inputs, torch.full((2, 4), 5 + 0 + 30))
    assert torch.equal(sources[1].next_batch().inputs, torch.full((2, 4), 5 + 1 + 30))
    assert sources[1].num_islands == 2


def test_factory_returning_a_non_source_is_refused() -> None:
    """An object without the DataSource methods is a ConfigError naming what it lacks."""
    with pytest.raises(
        ConfigError,
        match=r"data.name: '.*:not_a_source' returned object, which lacks next_batch, "
        r"val_batches, state_dict, load_state_dict",
    ):
        build(DataConfig(name=f"{__name__}:not_a_source"))


def test_factory_source_without_state_is_refused() -> None:
    """A source the checkpoint cannot save is refused when built, not at the first
    checkpoint."""
    with pytest.raises(ConfigError, match=r"returned Stateless, which lacks state_dict, load_st"):
        build(DataConfig(name=f"{__name__}:stateless_source"))


def test_unimportable_factory_names_data_name() -> None:
    """A factory path that does not import is a ConfigError naming data.name."""
    with pytest.raises(ConfigError, match=r"data.name: cannot import module 'no_such_mod_xyz'"):
        build(DataConfig(name="no_such_mod_xyz:make"))
