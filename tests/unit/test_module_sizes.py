"""Module size limits from STYLE.md: soft 400 lines, hard 600 in diloco/ (tinygrad's sz.py).

Prints the size table (`pytest -s`) and fails on a library module over the hard limit.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARD_LIMIT = 600


def _sizes(folder: str) -> dict[str, int]:
    return {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def test_no_library_module_over_the_hard_limit() -> None:
    sizes = {**_sizes("diloco"), **_sizes("islands")}
    for name, lines in sorted(sizes.items(), key=lambda item: -item[1]):
        print(f"{lines:6d}  {name}")
    assert sizes, "no modules found: the test is looking in the wrong place"
    too_long = {name: lines for name, lines in sizes.items() if lines > HARD_LIMIT}
    assert not too_long, f"modules over {HARD_LIMIT} lines, split them: {too_long}"
