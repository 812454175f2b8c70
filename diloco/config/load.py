"""Load an `IslandConfig`: schema defaults, then a YAML file, then dotted overrides.

Every failure becomes a `ConfigError` whose message is one line naming the file or key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diloco.config.schema import IslandConfig
from diloco.errors import ConfigError


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> IslandConfig:
    """Build the validated config of one island.

    Args:
        path: a YAML file, or None for the schema's defaults.
        overrides: omegaconf dotlist entries such as ``outer.inner_steps=100``.

    Returns:
        The typed config, with every ``__post_init__`` check passed.

    Raises:
        ConfigError: the file is missing or not YAML, a key is unknown, a type is wrong, or a
            value is impossible.
    """
    layers: list[Any] = [OmegaConf.structured(IslandConfig)]
    if path is not None:
        layers.append(_read_yaml(Path(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. outer.lr=0.5)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        for layer in layers[1:]:
            _check_sections(layer, layers[0], "")
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error)) from None
    assert isinstance(config, IslandConfig)
    return config


def to_yaml(config: IslandConfig) -> str:
    """The resolved config as YAML (what summary.json and checkpoints record)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_container(config: IslandConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-ready data."""
    container = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    assert isinstance(container, dict)
    return {str(key): value for key, value in container.items()}


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml's own errors are not OmegaConf's
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first_line}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return loaded


def _check_sections(given: Any, schema: Any, prefix: str) -> None:
    """A section given a scalar: omegaconf's merge error would name a class, not the key."""
    if not isinstance(given, DictConfig) or not isinstance(schema, DictConfig):
        return
    for key in given:
        if key not in schema:
            continue  # the merge reports unknown keys with the valid ones
        full_key = f"{prefix}{key!s}"
        expected = schema._get_node(key)
        if not isinstance(expected, DictConfig) or OmegaConf.get_type(expected) in (dict, None):
            continue  # a plain value or a free-form dict (model.args, data.args)
        value = given._get_node(key)
        if not isinstance(value, DictConfig):
            valid = ", ".join(_valid_keys(full_key))
            raise ConfigError(f"{full_key} must be a section of keys ({valid}), got {given[key]!r}")
        _check_sections(value, expected, f"{full_key}.")


def _describe(error: OmegaConfBaseException) -> str:
    """One line from omegaconf's multi-line message, with the valid keys where one is unknown."""
    full_key = getattr(error, "full_key", None)
    message = str(error).strip().splitlines()[0]
    unknown = re.match(r"Key '([^']+)' not in '([^']+)'", message)
    if unknown:
        key = full_key or unknown.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = ", ".join(_valid_keys(parent))
        where = f"in {parent!r}" if parent else "at the top level"
        hint = message.split("Did you mean:", 1)
        suggestion = f" Did you mean {hint[1].strip().rstrip('?')}?" if len(hint) == 2 else ""
        return f"unknown key {key!r}.{suggestion} Valid keys {where}: {valid}"
    if full_key:
        return f"{full_key}: {message}"
    return message


def _valid_keys(parent: str) -> list[str]:
    node: Any = OmegaConf.structured(IslandConfig)
    for part in [p for p in parent.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []
