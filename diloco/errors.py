"""Errors a user can cause and fix: the CLI turns them into one line and exit code 2."""


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the key and what was expected."""


class TrainingDiverged(RuntimeError):
    """The loss or the parameters are no longer finite: the run stops before it saves them."""


def require(ok: bool, key: str, expected: str, got: object) -> None:
    """Raise ConfigError("<key> must be <expected>, got <got>") unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {got!r}")
