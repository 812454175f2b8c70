"""Package attributes imported on first use (PEP 562 module `__getattr__`).

A package's `__init__` re-exports its public names without importing the modules that define
them, so importing a light module of the package (its config) does not load torch: a config
error answers at once. Each package lists its exports once, as name -> defining module.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """The `__getattr__` of `package`: each name in `exports` comes from its module."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    return __getattr__
