"""Shared test setup: `tests/harness.py` is importable as `harness` from every test folder.

pytest's default import mode already puts this directory on sys.path (it holds no
`__init__.py`); inserting it here keeps `from harness import ...` working under
`--import-mode=importlib` too. Spawned children inherit the parent's sys.path, so they import
the harness and the test modules whose functions they run the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
