"""Copy example files into the docs that show them, so the docs never drift from code that runs.

A Markdown page marks each example with a comment naming its file, followed by a fenced block:

    <!-- example: examples/plugins/half_codec.py -->
    ```python
    ...
    ```

`python tools/include_examples.py docs/plugins.md` rewrites every such block with the file's
current text (`make docs` runs it); `--check` only reports stale blocks and exits 1 (the test
suite runs that). The examples themselves are run by tests/e2e/test_plugin_examples.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(
    r"(<!-- example: (?P<path>[^ ]+) -->\n```(?P<lang>\w*)\n)(?P<body>.*?)(```)", re.S
)


def included(page: str) -> str:
    """`page` with every marked block replaced by its file's text."""

    def replace(match: re.Match[str]) -> str:
        text = (ROOT / match.group("path")).read_text()
        return f"{match.group(1)}{text}{match.group(5)}"

    return MARKER.sub(replace, page)


def examples_in(page: str) -> list[str]:
    return [match.group("path") for match in MARKER.finditer(page)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="report stale blocks, change nothing")
    args = parser.parse_args()
    stale = []
    for page in args.pages:
        text = page.read_text()
        fresh = included(text)
        if fresh != text:
            stale.append(str(page))
            if not args.check:
                page.write_text(fresh)
    if args.check and stale:
        print(f"stale examples in {', '.join(stale)}: run `make docs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
