"""Models: the built-in small GPT (`gpt.py`), user models from `module:factory` (`build.py`),
and the `model` section of the config (`config.py`).
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.models.build import build_model as build_model
    from diloco.models.config import ModelConfig as ModelConfig
    from diloco.models.flops import train_flops_per_token as train_flops_per_token
    from diloco.models.gpt import GPT as GPT
    from diloco.models.gpt import GPTConfig as GPTConfig

_EXPORTS = {
    "build_model": "diloco.models.build",
    "ModelConfig": "diloco.models.config",
    "train_flops_per_token": "diloco.models.flops",
    "GPT": "diloco.models.gpt",
    "GPTConfig": "diloco.models.gpt",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
