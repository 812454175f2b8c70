"""The one way this project writes a file: to a temporary file, flushed, then renamed into place.

A kill during a write leaves the previous file untouched and at worst a stray `*.tmp` file, so a
reader never sees half a file. Used by checkpoints, metrics, summaries, the coordinator's state
and the files islands leave for each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path | str, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `data` (bytes, text, or a function that writes a given path) to `path` atomically.

    The parent directory is created if needed; the rename itself is flushed to disk.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(temporary)
        else:
            with open(temporary, "wb") as handle:
                handle.write(data.encode() if isinstance(data, str) else data)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(final.parent)
    return final


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries: a rename must reach the disk, or a power cut can forget it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_strays(directory: Path) -> None:
    """Delete temporary files a killed writer left in `directory`."""
    if directory.is_dir():
        for stray in directory.glob("*.tmp"):
            stray.unlink(missing_ok=True)
