"""JEST's own settings: how a super-batch is scored, and the frozen reference model.

A light module (no torch) below both the `data.selector` section (`config.py`), which composes
them, and the selector itself (`jest.py`), which reads them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from diloco.errors import require


class JestScore(enum.Enum):
    learnability = "learnability"
    hard_learner = "hard_learner"
    easy_reference = "easy_reference"


@dataclass(kw_only=True)
class ReferenceConfig:
    checkpoint: str = ""
    """jest: the frozen reference's file: a diloco checkpoint (run.dir/checkpoints/round-*.pt)
    or a torch state_dict. Empty: train one first on data.selector.reference.data."""
    data: str = "stdlib"
    """jest: the clean data the reference trains on: stdlib (the built-in corpus's training
    split, without data.noise) or a text file's path (byte tokens)."""
    train_steps: int = 200
    """jest: AdamW steps (batches of data.batch_size) training the reference; its FLOPs are
    counted (reference_flops)."""
    lr: float = 2e-3
    """jest: peak AdamW learning rate of the reference's training."""
    n_layer: int = 0
    """jest, built-in GPT: the reference's blocks (0: model.n_layer). It may be smaller."""
    n_head: int = 0
    """jest, built-in GPT: the reference's attention heads (0: model.n_head)."""
    d_model: int = 0
    """jest, built-in GPT: the reference's width (0: model.d_model)."""

    def __post_init__(self) -> None:
        key = "data.selector.reference"
        require(self.train_steps >= 1, f"{key}.train_steps", ">= 1", self.train_steps)
        require(self.lr > 0, f"{key}.lr", "> 0", self.lr)
        for name in ("n_layer", "n_head", "d_model"):
            require(getattr(self, name) >= 0, f"{key}.{name}", ">= 0", getattr(self, name))
