"""`module:factory` paths: how users plug in their own model and data in a config.

A plug-in fails in the user's code, not ours: a module that raises while it imports, a factory
that raises while it builds, arguments the factory does not take. Each becomes a `ConfigError`
(exit 2) naming the config key and `module:factory`, with the user's exception kept as its
`__cause__` so that `diloco-island --debug` shows where in their code it came from.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from diloco.errors import ConfigError


def resolve_factory(path: str, key: str) -> Callable[..., Any]:
    """Import `module:attr` (attr may be dotted) and return the callable.

    The current directory is importable, so a user's `my_model.py` next to the config works.

    Raises:
        ConfigError: naming `key` when the module is missing or fails to import (any
            exception, kept as the cause), or the attribute is missing or not callable.
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
    except (Exception, SystemExit) as error:  # SystemExit: a module-level argparse or exit()
        raise ConfigError(
            f"{key}: module {module_name!r} failed to import: {_describe(error)}"
        ) from error
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}: {path!r} is not callable")
    return target  # type: ignore[no-any-return]


def call_factory(
    path: str,
    key: str,
    *,
    args: Mapping[str, Any],
    args_key: str,
    given: Mapping[str, Any] | None = None,
) -> Any:
    """Resolve `path` and call it with what diloco passes (`given`) and the user's `args`.

    Args:
        path: `module:factory` from the config.
        key: the config key holding `path` (`model.name`, `data.name`).
        args: the user's keyword arguments (`model.args`, `data.args`).
        args_key: the config key holding `args`.
        given: keyword arguments diloco passes itself (`seq_len`, `island`, ...).

    Returns:
        Whatever the factory returns; the caller checks its type.

    Raises:
        ConfigError: the factory cannot be resolved (see `resolve_factory`), an entry of
            `args` collides with `given`, the factory does not take these arguments, or it
            raised while building (kept as the cause).
    """
    factory = resolve_factory(path, key)
    given = dict(given or {})
    for name in args:
        if name in given:
            raise ConfigError(
                f"{args_key}.{name} cannot be set: diloco passes {name} to {path!r} itself "
                "(from the config)"
            )
    kwargs = {**given, **args}
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C extension without a signature
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as error:
            raise ConfigError(f"{args_key} do not fit {path!r}: {error}") from None
    try:
        return factory(**kwargs)
    except (Exception, SystemExit) as error:  # the user's code: whatever it raises
        raise ConfigError(f"{key}: {path!r} raised {_describe(error)}") from error


def _describe(error: BaseException) -> str:
    """`Type: first line of the message` (a multi-line message would break the one-line rule)."""
    lines = str(error).strip().splitlines()
    name = type(error).__name__
    return f"{name}: {lines[0]}" if lines else name
