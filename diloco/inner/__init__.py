"""The inner loop: AdamW steps with warm-up and cosine decay on one island's replica.

`trainer.py` (`InnerTrainer`), `schedule.py` (the learning-rate schedule), `config.py` (the
`inner` section).
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.inner.config import InnerConfig as InnerConfig
    from diloco.inner.schedule import warmup_cosine_lr as warmup_cosine_lr
    from diloco.inner.trainer import InnerTrainer as InnerTrainer
    from diloco.inner.trainer import move_to as move_to
    from diloco.inner.trainer import param_groups as param_groups

_EXPORTS = {
    "InnerConfig": "diloco.inner.config",
    "warmup_cosine_lr": "diloco.inner.schedule",
    "InnerTrainer": "diloco.inner.trainer",
    "move_to": "diloco.inner.trainer",
    "param_groups": "diloco.inner.trainer",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
