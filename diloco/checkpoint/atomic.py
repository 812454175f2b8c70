"""Atomic checkpoints: written to a temporary file, flushed, then renamed into place.

A kill during a save leaves the previous checkpoints untouched and at worst a stray
temporary file, which the next save removes. Files are named `round-000012.pt` (the number of
completed outer rounds) and the newest `keep` are kept.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^round-(\d{6,})\.pt$")


def checkpoint_path(directory: Path, round: int) -> Path:
    return directory / f"round-{round:06d}.pt"


def save_checkpoint(directory: Path, round: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `round` atomically; keep the newest `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    for stray in directory.glob("*.tmp"):
        stray.unlink(missing_ok=True)
    final = checkpoint_path(directory, round)
    temporary = final.with_suffix(".pt.tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    _fsync_directory(directory)
    for old in sorted(list_checkpoints(directory))[:-keep]:
        checkpoint_path(directory, old).unlink(missing_ok=True)
    return final


def list_checkpoints(directory: Path) -> list[int]:
    """The rounds that have a complete checkpoint in `directory`, ascending."""
    if not directory.is_dir():
        return []
    rounds = (_NAME.match(path.name) for path in directory.iterdir())
    return sorted(int(match.group(1)) for match in rounds if match)


def load_checkpoint(directory: Path, round: int) -> dict[str, Any]:
    state = torch.load(checkpoint_path(directory, round), map_location="cpu", weights_only=False)
    assert isinstance(state, dict)
    return state


def _fsync_directory(directory: Path) -> None:
    # The rename itself must reach the disk, or a power cut can forget it.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
