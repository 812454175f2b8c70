"""Errors a user can cause and fix: the CLI turns them into one line and exit code 2."""


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the key and what was expected."""
