"""The built-in `stdlib` corpus: standard-library sources as byte tokens, split by file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diloco.data.corpus import (
    FILE_SEPARATOR,
    is_validation_file,
    load_stdlib_corpus,
    stdlib_files,
)

# crc32(path) % 10_000 of these names: a.py 1502, b.py 8016, c.py 7765, f.py 5639, g.py 2274,
# pkg/d.py 2097, pkg/e.py 4324. With val_fraction 0.3 the validation files are a, g, pkg/d.
FAKE_FILES = ["a.py", "b.py", "c.py", "f.py", "g.py", "pkg/d.py", "pkg/e.py"]
FAKE_VAL = {"a.py", "g.py", "pkg/d.py"}


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A tiny standard library: a few .py files, plus files the corpus must ignore."""
    for name in FAKE_FILES:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"def {path.stem}():\n    return {len(name)}\n".encode())
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "thirdparty.py").write_text("import numpy\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    return tmp_path


def test_split_is_a_fixed_hash_of_the_path() -> None:
    """The split of a path is the same on every machine: pinned to crc32 buckets."""
    assert is_validation_file("os.py", 0.1)  # bucket 823
    assert not is_validation_file("json/__init__.py", 0.5)  # bucket 8009
    assert not is_validation_file("a.py", 0.15) and is_validation_file("a.py", 0.16)  # 1502
    assert [is_validation_file(name, 0.3) for name in FAKE_FILES] == [
        name in FAKE_VAL for name in FAKE_FILES
    ]


def test_split_grows_with_the_fraction_and_matches_it_roughly() -> None:
    """A file in the 5% split stays in the 10% split, and about 10% of paths land there."""
    names = [f"pkg{i % 7}/module_{i}.py" for i in range(3000)]
    small = {n for n in names if is_validation_file(n, 0.05)}
    large = {n for n in names if is_validation_file(n, 0.1)}
    assert small <= large
    assert 0.08 < len(large) / len(names) < 0.12
    assert 0.035 < len(small) / len(names) < 0.065
    assert not any(is_validation_file(n, 0.0) for n in names)
    assert all(is_validation_file(n, 1.0) for n in names)


def test_stdlib_files_sorted_and_without_site_packages(fake_root: Path) -> None:
    """Only .py files, never site-packages, sorted by their path relative to the root."""
    relative = [p.relative_to(fake_root).as_posix() for p in stdlib_files(fake_root)]
    assert relative == sorted(FAKE_FILES)


def test_load_fake_corpus_is_the_files_joined_by_split(fake_root: Path) -> None:
    """train and val are the files of each split, in path order, joined by a blank line."""
    train, val = load_stdlib_corpus(0.3, root=fake_root)
    assert train.dtype == np.uint8 and val.dtype == np.uint8

    def joined(names: list[str]) -> bytes:
        return FILE_SEPARATOR.join((fake_root / n).read_bytes() for n in sorted(names))

    assert train.tobytes() == joined([n for n in FAKE_FILES if n not in FAKE_VAL])
    assert val.tobytes() == joined(sorted(FAKE_VAL))
    again_train, again_val = load_stdlib_corpus(0.3, root=fake_root)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)


def test_split_does_not_depend_on_other_files(fake_root: Path) -> None:
    """Adding a file moves no other file between train and val."""
    _, val_before = load_stdlib_corpus(0.3, root=fake_root)
    (fake_root / "b2.py").write_text("def b2(): pass\n")  # crc bucket decides only b2's side
    _, val_after = load_stdlib_corpus(0.3, root=fake_root)
    if is_validation_file("b2.py", 0.3):
        assert val_before.tobytes() in val_after.tobytes()
    else:
        assert val_after.tobytes() == val_before.tobytes()


def test_empty_root_raises_file_not_found(tmp_path: Path) -> None:
    """No sources (a bytecode-only install): a clear FileNotFoundError naming the root."""
    with pytest.raises(FileNotFoundError, match="no standard-library sources found under"):
        load_stdlib_corpus(0.3, root=tmp_path)


def test_one_sided_split_names_the_fraction(fake_root: Path) -> None:
    """A fraction that holds out no file (or every file) is refused, naming data.val_fraction
    rather than claiming the sources are missing."""
    with pytest.raises(ValueError, match=r"data.val_fraction=0.0001 leaves the validation split"):
        load_stdlib_corpus(0.0001, root=fake_root)
    with pytest.raises(ValueError, match=r"leaves the training split of the 7 standard-library"):
        load_stdlib_corpus(0.9, root=fake_root)


@pytest.mark.slow
def test_real_stdlib_corpus() -> None:
    """The running Python's stdlib: megabytes of real Python text, about 2% held out."""
    train, val = load_stdlib_corpus(0.02)
    assert train.dtype == np.uint8 and val.dtype == np.uint8
    assert len(train) > 1_000_000 and len(val) > 10_000
    assert 0.002 < len(val) / (len(train) + len(val)) < 0.1
    assert b"def " in train[:200_000].tobytes() and b"import " in val.tobytes()
