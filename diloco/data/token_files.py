"""User data from files: plain text (byte tokens) or nanoGPT-style token files (.bin).

A token file is a flat array of uint16 or uint32 token ids, as nanoGPT's `prepare.py` writes
it; it is memory-mapped, so a file larger than memory works.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_text_tokens(path: str | Path) -> np.ndarray:
    """The bytes of a text file as uint8 tokens (vocabulary 256)."""
    return np.fromfile(Path(path), dtype=np.uint8)


def read_token_file(path: str | Path, dtype: str) -> np.ndarray:
    """A memory map of a token file of `dtype` (uint16 or uint32)."""
    path = Path(path)
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"{path} has {size} bytes, not a whole number of {dtype} tokens")
    if size == 0:
        raise ValueError(f"{path} is empty")
    return np.memmap(path, dtype=dtype, mode="r")


def split_tail(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last `val_fraction` of the tokens is held out."""
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]
