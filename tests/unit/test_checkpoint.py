"""Checkpoints: named tensors + JSON, a checksum, atomic writes, keep N, damaged files found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diloco.checkpoint import (
    DamagedCheckpoint,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    newest_intact,
    old_format_checkpoints,
    save_checkpoint,
    write_atomic,
)


def _state(value: float) -> dict[str, Any]:
    return {"anchor": torch.full((3,), value), "round": int(value), "nested": {"k": [1, 2]}}


def test_save_list_load_round_trip(tmp_path: Path) -> None:
    """A saved state loads back equal; the file is named after the round."""
    path = save_checkpoint(tmp_path / "ckpt", 12, _state(12.0), keep=2)
    name = "round-000012.safetensors"
    assert path == tmp_path / "ckpt" / name == checkpoint_path(tmp_path / "ckpt", 12)
    assert list_checkpoints(tmp_path / "ckpt") == [12]
    loaded = load_checkpoint(tmp_path / "ckpt", 12)
    assert torch.equal(loaded["anchor"], torch.full((3,), 12.0))
    assert loaded["round"] == 12 and loaded["nested"] == {"k": [1, 2]}


def test_every_kind_of_state_comes_back_as_it_was(tmp_path: Path) -> None:
    """Tuples stay tuples, int keys stay ints, numpy arrays stay numpy, None/bool/str/NaN,
    views of one storage, 0-dim tensors and other dtypes: what optimizers and data sources
    put in their state_dicts."""
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(4)
    optimizer.step()
    base = torch.arange(10.0)
    state = {
        "optimizer": optimizer.state_dict(),
        "tuple": (1, 2.5, "s", None, True),
        "numpy": np.arange(5, dtype=np.int64),
        "nan": float("nan"),
        "views": [base[:5], base[5:]],
        "scalar": torch.tensor(3, dtype=torch.int64),
        "rng": torch.get_rng_state(),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
    }
    save_checkpoint(tmp_path, 1, state, keep=1)
    loaded = load_checkpoint(tmp_path, 1)
    assert loaded["tuple"] == (1, 2.5, "s", None, True)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(loaded["optimizer"]["state"]) == {0}
    assert torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state[param]["exp_avg"]
    )
    assert isinstance(loaded["numpy"], np.ndarray) and loaded["numpy"].tolist() == [0, 1, 2, 3, 4]
    assert loaded["nan"] != loaded["nan"]
    assert torch.equal(loaded["views"][1], base[5:])
    assert loaded["scalar"].shape == () and int(loaded["scalar"]) == 3
    assert torch.equal(loaded["rng"], torch.get_rng_state())
    assert loaded["bf16"].dtype == torch.bfloat16
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.randn(4))])
    fresh.load_state_dict(loaded["optimizer"])  # loads into a real optimizer


def test_an_object_that_is_not_data_is_refused(tmp_path: Path) -> None:
    """Only data is saved (no pickle): an arbitrary object is refused, naming where it is."""
    with pytest.raises(TypeError, match=r"cannot checkpoint a object at \.data\.x"):
        save_checkpoint(tmp_path, 1, {"data": {"x": object()}}, keep=1)
    assert list_checkpoints(tmp_path) == []


def test_the_file_holds_no_pickle(tmp_path: Path) -> None:
    """A safetensors file: an 8-byte header length, a JSON header, raw bytes; no pickle opcode
    stream (a pickle starts with 0x80) and no torch zip archive."""
    path = save_checkpoint(tmp_path, 1, _state(1.0), keep=1)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert data[8:9] == b"{" and header < len(data)
    assert not data.startswith(b"PK") and b"\x80\x04" not in data[: 8 + header]


def test_list_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    """No directory yet (a fresh run): no checkpoints, no error."""
    assert list_checkpoints(tmp_path / "never-created") == []


def test_list_is_ascending_numerically(tmp_path: Path) -> None:
    """Rounds sort as numbers, including past six digits."""
    for round in (9, 1_000_000, 10):
        save_checkpoint(tmp_path, round, _state(1.0), keep=10)
    assert list_checkpoints(tmp_path) == [9, 10, 1_000_000]


def test_keep_prunes_to_the_newest(tmp_path: Path) -> None:
    """keep=N leaves only the N newest rounds on disk."""
    for round in range(1, 6):
        save_checkpoint(tmp_path, round, _state(float(round)), keep=2)
    assert list_checkpoints(tmp_path) == [4, 5]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["round-000004.safetensors", "round-000005.safetensors"]
    assert load_checkpoint(tmp_path, 5)["round"] == 5


def test_stray_files_are_ignored_and_tmp_removed_by_the_next_save(tmp_path: Path) -> None:
    """A temporary file from a killed save is not a checkpoint and is cleaned up; files of
    other names are left alone."""
    save_checkpoint(tmp_path, 1, _state(1.0), keep=3)
    stray = tmp_path / "round-000002.safetensors.123.tmp"
    stray.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "round-2.safetensors").write_bytes(b"")  # fewer than six digits: not ours
    assert list_checkpoints(tmp_path) == [1]
    save_checkpoint(tmp_path, 2, _state(2.0), keep=3)
    assert not stray.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert list_checkpoints(tmp_path) == [1, 2]


def test_crash_during_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save killed half-way leaves the previous checkpoint listed and loadable, no partial
    file under a checkpoint's name, and the next save succeeds."""
    import diloco.checkpoint.store as store

    save_checkpoint(tmp_path, 1, _state(1.0), keep=1)

    def dying_save(path: Path, tensors: Any, metadata: Any, after_read: Any) -> None:
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(store, "_write_safetensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _state(2.0), keep=1)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [1]
    assert load_checkpoint(tmp_path, 1)["round"] == 1
    save_checkpoint(tmp_path, 2, _state(2.0), keep=1)
    assert list_checkpoints(tmp_path) == [2]


def test_load_of_a_missing_round_raises(tmp_path: Path) -> None:
    """Loading a round that was never saved is a FileNotFoundError naming the file."""
    save_checkpoint(tmp_path, 1, _state(1.0), keep=1)
    with pytest.raises(FileNotFoundError, match="round-000007.safetensors"):
        load_checkpoint(tmp_path, 7)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",  # 0 bytes
        lambda data: bytes(range(256)) * 8,  # random bytes
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # one bit of a tensor flipped
    ],
    ids=["empty", "garbage", "truncated", "bit-flip"],
)
def test_a_damaged_file_is_detected_and_the_newest_intact_one_is_used(
    tmp_path: Path, damage: Any
) -> None:
    """Every kind of damage raises DamagedCheckpoint naming the file, never another error, and
    newest_intact falls back to the previous round."""
    save_checkpoint(tmp_path, 1, _state(1.0), keep=2)
    path = save_checkpoint(tmp_path, 2, _state(2.0), keep=2)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DamagedCheckpoint, match="round-000002.safetensors"):
        load_checkpoint(tmp_path, 2)
    found = newest_intact(tmp_path, list_checkpoints(tmp_path))
    assert found is not None and found[0] == 1 and found[1]["round"] == 1


def test_no_intact_checkpoint_is_none(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, _state(1.0), keep=1)
    path.write_bytes(b"\x00" * 16)
    assert newest_intact(tmp_path, [1]) is None


def test_old_pickle_checkpoints_are_found_not_listed(tmp_path: Path) -> None:
    """round-*.pt files of earlier versions are never listed (so never loaded), but found."""
    (tmp_path / "round-000003.pt").write_bytes(b"\x80\x04old pickle")
    assert list_checkpoints(tmp_path) == []
    assert [p.name for p in old_format_checkpoints(tmp_path)] == ["round-000003.pt"]


def test_write_atomic_writes_text_bytes_and_callables(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a" / "t.txt", "text")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "c.txt", lambda path: path.write_text("made by a writer"))
    assert (tmp_path / "a" / "t.txt").read_text() == "text"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.txt").read_text() == "made by a writer"
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_atomic_keeps_the_old_file_when_the_writer_dies(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    write_atomic(target, "old")

    def dies(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomic(target, dies)
    assert target.read_text() == "old"
    assert not list(tmp_path.glob("*.tmp"))


def test_the_file_is_safetensors_with_every_dtype_a_state_holds(tmp_path: Path) -> None:
    """safetensors' own reader takes the file back bit for bit: each dtype, a scalar, an empty
    tensor, a tensor longer than one write chunk; the header is padded to 8 bytes."""
    from safetensors.torch import load_file

    import diloco.checkpoint.store as store

    tensors = {
        "f32": torch.randn(store._CHUNK_BYTES // 4 + 3),  # two chunks, the last partial
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 3).to(torch.float16),
        "f64": torch.randn(3, dtype=torch.float64),
        "i64": torch.tensor([-1, 2**40]),
        "i32": torch.tensor([3], dtype=torch.int32),
        "i16": torch.tensor([-4], dtype=torch.int16),
        "i8": torch.tensor([-5], dtype=torch.int8),
        "u8": torch.tensor([250], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    read: dict[str, list[tuple[int, int]]] = {}
    save_checkpoint(
        tmp_path,
        1,
        {"state": tensors},
        keep=1,
        after_read=lambda t, a, b: read.setdefault(
            next(n for n, x in tensors.items() if x.data_ptr() == t.data_ptr()), []
        ).append((a, b)),
    )
    path = tmp_path / "round-000001.safetensors"
    loaded = load_file(str(path))
    for name, tensor in tensors.items():
        assert loaded[f".state.{name}"].dtype == tensor.dtype
        assert torch.equal(loaded[f".state.{name}"], tensor), name
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0
    step = store._CHUNK_BYTES // 4
    big = tensors["f32"].numel()
    assert read["f32"] == [(0, step), (step, big)] * 2  # the checksum's pass, then the file's
    assert load_checkpoint(tmp_path, 1)["state"]["bf16"].dtype == torch.bfloat16


def test_a_tensor_of_a_dtype_safetensors_cannot_hold_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="complex64"):
        save_checkpoint(tmp_path, 1, {"z": torch.zeros(2, dtype=torch.complex64)}, keep=1)
    assert list_checkpoints(tmp_path) == []
