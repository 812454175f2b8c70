"""Load an `IslandConfig`: schema defaults, then a YAML file, then dotted overrides.

Every failure becomes a `ConfigError` whose message is one line naming the file, the override
or the key: the text a user hands us (a file, an override's value) is parsed here, and any
parser's error is turned into that line, whatever its class. Then the numbers and the sizes
are checked (diloco/config/checks.py) before anything is built.
"""

from __future__ import annotations

import difflib
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import BooleanNode, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diloco.config.checks import check_numbers, check_sizes
from diloco.config.schema import IslandConfig
from diloco.errors import ConfigError

# A config is a few KiB; anything this big is a data file passed as --config by mistake, and
# is refused before it is read into memory.
MAX_CONFIG_BYTES = 1 << 20


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
    layers.extend(_parse_override(item) for item in overrides)
    try:
        for layer in layers[1:]:
            _check_shapes(layer, layers[0], "")
        merged = OmegaConf.merge(*layers)
        assert isinstance(merged, DictConfig)
        check_numbers(merged)
        config = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error)) from None
    assert isinstance(config, IslandConfig)
    check_sizes(config)
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
    """The file's mapping of sections; anything else (empty, a list, binary) is one line."""
    name = f"config file {str(path)!r}"
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{name} does not exist") from None
    except OSError as error:
        raise ConfigError(f"{name} cannot be read: {error.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{name} is a directory, not a YAML file")
    if not stat.S_ISREG(info.st_mode):  # a pipe or a device could block or never end
        raise ConfigError(f"{name} is not a regular file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{name} is {info.st_size} bytes; a config is a few KiB (is it a data file?)"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ConfigError(f"{name} cannot be read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{name} is not UTF-8 text (byte {error.start}): not YAML") from None
    try:
        # safe_load for the document's shape only: OmegaConf.create reads a bare word as a key.
        shape = yaml.safe_load(text)
        loaded = OmegaConf.create(text) if isinstance(shape, dict) and shape else None
    except (yaml.YAMLError, OmegaConfBaseException, RecursionError) as error:
        raise ConfigError(f"{name} is not valid YAML: {_first_line(error)}") from None
    if shape is None or shape == {}:
        raise ConfigError(
            f"{name} holds no settings (an empty file would start the default run); "
            "give at least run.dir"
        )
    if not isinstance(loaded, DictConfig):
        got = type(shape).__name__
        raise ConfigError(f"{name} must hold a mapping of sections, got a YAML {got}")
    return loaded


def _parse_override(item: str) -> DictConfig:
    """One `key=value` override as a config layer; its value is YAML (`[1, 2]`, `{a: 1}`)."""
    shown = item if len(item) <= 60 else f"{item[:40]}…"
    key, equals, _ = item.partition("=")
    if not equals:
        raise ConfigError(f"override {shown!r} must look like key=value (e.g. outer.lr=0.5)")
    if not key:
        raise ConfigError(f"override {shown!r} must look like key=value (the key is empty)")
    if not all(key.split(".")):
        raise ConfigError(
            f"override {shown!r} must look like key=value (the key has an empty part)"
        )
    try:
        return OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, RecursionError) as error:
        raise ConfigError(
            f"override {shown!r}: the value is not valid YAML ({_first_line(error)})"
        ) from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"override {shown!r}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    """yaml's `problem` ("did not find expected ',' or ']'"), else the message's first line."""
    if isinstance(error, RecursionError):  # pure-Python yaml and omegaconf both recurse
        return "nested too deeply"
    problem = getattr(error, "problem", None)
    if isinstance(problem, str) and problem:
        return problem
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_shapes(given: Any, schema: Any, prefix: str) -> None:
    """What omegaconf's merge would get wrong without a word: a section given a scalar (its
    error names a class, not the key), and a switch given a number other than 0 or 1 (it
    reads any such number as true: `transport.grpc.insecure: -1` would turn TLS off)."""
    if not isinstance(given, DictConfig) or not isinstance(schema, DictConfig):
        return
    for key in given:
        if key not in schema:
            continue  # the merge reports unknown keys with the valid ones
        full_key = f"{prefix}{key!s}"
        expected = schema._get_node(key)
        value = given._get_node(key)
        if isinstance(expected, BooleanNode):
            _check_switch(full_key, value._value() if value is not None else None)
            continue
        if not isinstance(expected, DictConfig) or OmegaConf.get_type(expected) in (dict, None):
            continue  # a plain value or a free-form dict (model.args, data.args)
        if not isinstance(value, DictConfig):
            valid = ", ".join(_valid_keys(full_key))
            raise ConfigError(f"{full_key} must be a section of keys ({valid}), got {given[key]!r}")
        _check_shapes(value, expected, f"{full_key}.")


def _check_switch(key: str, value: Any) -> None:
    """true/false (and omegaconf's yes/no/on/off words, and 0 or 1); no other number."""
    number = value
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        number = int(value)
    if isinstance(number, int) and not isinstance(number, bool) and number not in (0, 1):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def _describe(error: OmegaConfBaseException) -> str:
    """One line from omegaconf's multi-line message, with the valid keys where one is unknown."""
    full_key = getattr(error, "full_key", None)
    message = str(error).strip().splitlines()[0]
    unknown = re.match(r"Key '([^']+)' not in '([^']+)'", message)
    if unknown:
        key = full_key or unknown.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        keys = _valid_keys(parent)
        valid = ", ".join(keys)
        where = f"in {parent!r}" if parent else "at the top level"
        # Our own guess: omegaconf's stops suggesting once a section has many keys.
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], keys, n=1, cutoff=0.6)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown key {key!r}.{suggestion} Valid keys {where}: {valid}"
    if full_key:
        return f"{full_key}: {message}"
    return message


def _valid_keys(parent: str) -> list[str]:
    node: Any = OmegaConf.structured(IslandConfig)
    for part in [p for p in parent.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []
