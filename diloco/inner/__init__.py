"""The inner loop: AdamW steps with warm-up and cosine decay on one island's replica."""

from diloco.inner.schedule import warmup_cosine_lr
from diloco.inner.trainer import InnerTrainer, move_to, param_groups

__all__ = ["InnerTrainer", "move_to", "param_groups", "warmup_cosine_lr"]
