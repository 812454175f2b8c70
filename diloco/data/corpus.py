"""The built-in corpus `stdlib`: the running Python's standard-library sources, as bytes.

Real text, present on every machine without a download. Tokens are bytes (vocabulary 256).
The train/val split is by file, decided by a hash of each file's relative path, so it is the
same on every machine with the same Python version and never depends on file order.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import numpy as np

FILE_SEPARATOR = b"\n\n"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every .py file of the standard library (not site-packages), sorted by relative path."""
    root = root or stdlib_root()
    files = [
        path
        for path in root.rglob("*.py")
        if "site-packages" not in path.parts and "dist-packages" not in path.parts
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def is_validation_file(relative_path: str, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split (a fixed hash of its path)."""
    bucket = zlib.crc32(relative_path.encode()) % 10_000
    return bucket < val_fraction * 10_000


def load_stdlib_corpus(
    val_fraction: float, root: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The (train, val) byte arrays of the standard-library corpus.

    Raises:
        FileNotFoundError: when the standard library has no sources to read (some minimal
            installs ship only bytecode).
        ValueError: when `val_fraction` puts every file on one side of the split.
    """
    root = root or stdlib_root()
    train: list[bytes] = []
    val: list[bytes] = []
    for path in stdlib_files(root):
        try:
            text = path.read_bytes()
        except OSError:
            continue  # an unreadable file is skipped, the split of the others is unchanged
        split = (
            val if is_validation_file(path.relative_to(root).as_posix(), val_fraction) else train
        )
        split.append(text)
    if not train and not val:
        raise FileNotFoundError(f"no standard-library sources found under {root}")
    if not train or not val:
        empty = "validation" if not val else "training"
        raise ValueError(
            f"data.val_fraction={val_fraction} leaves the {empty} split of the "
            f"{len(train) + len(val)} standard-library files under {root} empty"
        )
    return (
        np.frombuffer(FILE_SEPARATOR.join(train), dtype=np.uint8),
        np.frombuffer(FILE_SEPARATOR.join(val), dtype=np.uint8),
    )
