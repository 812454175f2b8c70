"""Atomic checkpoints: save, list, load, prune, and survive a crash during a save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diloco.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint


def _state(value: float) -> dict[str, Any]:
    return {"anchor": torch.full((3,), value), "round": int(value), "nested": {"k": [1, 2]}}


def test_save_list_load_round_trip(tmp_path: Path) -> None:
    """A saved state loads back equal; the file is named after the round."""
    path = save_checkpoint(tmp_path / "ckpt", 12, _state(12.0), keep=2)
    assert path == tmp_path / "ckpt" / "round-000012.pt" == checkpoint_path(tmp_path / "ckpt", 12)
    assert list_checkpoints(tmp_path / "ckpt") == [12]
    loaded = load_checkpoint(tmp_path / "ckpt", 12)
    assert torch.equal(loaded["anchor"], torch.full((3,), 12.0))
    assert loaded["round"] == 12 and loaded["nested"] == {"k": [1, 2]}


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000004.pt", "round-000005.pt"]
    assert load_checkpoint(tmp_path, 5)["round"] == 5


def test_stray_files_are_ignored_and_tmp_removed_by_the_next_save(tmp_path: Path) -> None:
    """A temporary file from a killed save is not a checkpoint and is cleaned up; files of
    other names are left alone."""
    save_checkpoint(tmp_path, 1, _state(1.0), keep=3)
    stray = tmp_path / "round-000002.pt.tmp"
    stray.write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "round-2.pt").write_bytes(b"")  # fewer than six digits: not ours
    assert list_checkpoints(tmp_path) == [1]

    save_checkpoint(tmp_path, 2, _state(2.0), keep=3)
    assert not stray.exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert list_checkpoints(tmp_path) == [1, 2]
    assert load_checkpoint(tmp_path, 2)["round"] == 2


def test_crash_during_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save killed half-way (torch.save wrote some bytes, then died) leaves the previous
    checkpoint listed and loadable, and the next save succeeds."""
    save_checkpoint(tmp_path, 1, _state(1.0), keep=1)
    real_save = torch.save

    def dying_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"PK\x03\x04 partial")
        handle.flush()
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt, match="killed mid-save"):
        save_checkpoint(tmp_path, 2, _state(2.0), keep=1)

    assert list_checkpoints(tmp_path) == [1]
    assert not checkpoint_path(tmp_path, 2).exists()
    assert torch.equal(load_checkpoint(tmp_path, 1)["anchor"], torch.full((3,), 1.0))

    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint(tmp_path, 2, _state(2.0), keep=1)
    assert list_checkpoints(tmp_path) == [2]
    assert [p.name for p in tmp_path.iterdir()] == ["round-000002.pt"]


def test_load_of_a_missing_round_raises(tmp_path: Path) -> None:
    """Loading a round that was never saved is a FileNotFoundError naming the file."""
    save_checkpoint(tmp_path, 1, _state(1.0), keep=1)
    with pytest.raises(FileNotFoundError, match="round-000007.pt"):
        load_checkpoint(tmp_path, 7)
