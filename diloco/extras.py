"""Optional dependencies (the pyproject extras): imported when a config asks for them.

`pip install -e .` without extras still runs the demo; a config that needs an extra gets one
line naming the key and the install command instead of an ImportError's traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from diloco.errors import ConfigError


def require_extra(module: str, *, key: str, extra: str) -> ModuleType:
    """Import `module`, or explain which extra provides it.

    Args:
        module: the import name (transformers, datasets, wandb).
        key: the config key or setting that needs it, for the message.
        extra: the pyproject extra that installs it (hf, wandb, plots).

    Raises:
        ConfigError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"{key} needs the {module} package, which is missing ({error}): "
            f'pip install -e ".[{extra}]"'
        ) from None
