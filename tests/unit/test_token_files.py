"""User data files: text as byte tokens, nanoGPT-style uint16/uint32 token files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diloco.data.token_files import read_text_tokens, read_token_file, split_tail


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_read_token_file_as_written_by_numpy(tmp_path: Path, dtype: str) -> None:
    """A flat array written with numpy's tofile reads back with the same ids and dtype."""
    tokens = np.array([0, 1, 255, 256, 50_000, 65_535], dtype=dtype)
    if dtype == "uint32":
        tokens[-1] = 100_000  # does not fit 16 bits
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    read = read_token_file(path, dtype)
    assert read.dtype == np.dtype(dtype)
    assert np.array_equal(read, tokens)


def test_token_file_of_odd_byte_size_is_refused(tmp_path: Path) -> None:
    """3 bytes are not whole uint16 tokens: refused, naming the size and the dtype."""
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match=r"odd.bin has 3 bytes, not a whole number of uint16"):
        read_token_file(path, "uint16")
    path.write_bytes(b"\x00" * 6)
    with pytest.raises(ValueError, match=r"has 6 bytes, not a whole number of uint32 tokens"):
        read_token_file(path, "uint32")


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    """An empty file is refused with a message, not numpy's mmap error."""
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin is empty"):
        read_token_file(path, "uint16")


def test_text_tokens_are_the_bytes(tmp_path: Path) -> None:
    """A text file's tokens are its UTF-8 bytes, vocabulary 256."""
    path = tmp_path / "t.txt"
    path.write_text("def é():\n", encoding="utf-8")
    tokens = read_text_tokens(path)
    assert tokens.dtype == np.uint8
    assert tokens.tobytes() == "def é():\n".encode()


def test_split_tail_holds_out_the_end() -> None:
    """The last val_fraction of the tokens is the validation split; nothing lost or shared."""
    tokens = np.arange(100)
    train, val = split_tail(tokens, 0.1)
    assert np.array_equal(train, np.arange(90)) and np.array_equal(val, np.arange(90, 100))
    train, val = split_tail(np.arange(7), 0.5)
    assert len(train) == 3 and len(val) == 4
    assert np.array_equal(np.concatenate([train, val]), np.arange(7))
