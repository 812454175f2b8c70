"""Errors a user can cause and fix: the CLI turns them into one line and exit code 2."""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the key and what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss or the parameters are no longer finite: the run stops before it saves them."""


def require(ok: bool, key: str, expected: str, got: object) -> None:
    """Raise ConfigError("<key> must be <expected>, got <got>") unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {got!r}")


def existing_file(key: str, path: str | Path) -> Path:
    """The file config key `key` names (`~` expanded); a ConfigError naming the key when it
    does not exist or is a directory (read later, either would be a bare OSError)."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise ConfigError(f"{key}: {str(file)!r} is a directory, not a file")
    if not file.is_file():
        raise ConfigError(f"{key}: file {str(file)!r} does not exist")
    return file
