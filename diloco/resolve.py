"""`module:factory` paths: how users plug in their own model and data in a config."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diloco.errors import ConfigError


def resolve_factory(path: str, key: str) -> Callable[..., Any]:
    """Import `module:attr` (attr may be dotted) and return the callable.

    The current directory is importable, so a user's `my_model.py` next to the config works.

    Raises:
        ConfigError: naming `key` when the module or attribute is missing or not callable.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key} must look like module:factory, got {path!r}")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({error})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}: {path!r} is not callable")
    return target  # type: ignore[no-any-return]
