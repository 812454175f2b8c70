"""Errors a user can cause and fix: the CLI turns them into one line and exit code 2."""

from __future__ import annotations

import errno
import socket
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


def listen_error(key: str, address: str, error: OSError) -> Exception:
    """What binding `address` (config key `key`) failed with, in words that name the key: a
    host that does not resolve or is not this machine's is the config's (ConfigError); a port
    in use or refused is the machine's at this moment (OSError, a runtime failure)."""
    if isinstance(error, socket.gaierror):
        return ConfigError(f"{key}: the host of {address!r} does not resolve ({error.strerror})")
    if error.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"{key}: {address!r} is not an address of this machine")
    if error.errno == errno.EADDRINUSE:
        return OSError(f"{key}: {address} is in use (another run or coordinator on this machine?)")
    if error.errno == errno.EACCES:
        return OSError(f"{key}: {address}: permission denied (a port below 1024 needs root)")
    return OSError(f"{key}: cannot listen on {address}: {error.strerror or error}")


def make_directory(key: str, path: str | Path) -> Path:
    """Create the directory `key` names, with its parents; a ConfigError naming the key when
    it cannot be one (a file is there, or a parent cannot hold it)."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{key}: {str(directory)!r} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"{key}: {str(directory)!r} cannot be created: {reason}") from None
    return directory


def read_text_file(key: str, path: str | Path) -> str:
    """The UTF-8 text of the file `key` names; a ConfigError naming the key when it is missing,
    a directory, unreadable or not text (a binary file given by mistake)."""
    file = existing_file(key, path)
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{key}: {str(file)!r} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"{key}: {str(file)!r} cannot be read: {error.strerror}") from None
