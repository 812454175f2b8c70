"""The `inner` section: each island's AdamW optimizer and its learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

from diloco.errors import require


@dataclass(kw_only=True)
class InnerConfig:
    lr: float = 4e-4
    """Peak inner AdamW learning rate (the paper: 4e-4)."""
    warmup_steps: int = 1000
    """Linear warm-up, in inner steps (the paper: 1000)."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio after outer.rounds * outer.inner_steps steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (the paper: 0.1)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (the paper: 0.95)."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0: no clipping)."""
    grad_accum: int = 1
    """Micro-batches per inner step (gradient accumulation): each of data.batch_size
    sequences per rank; their gradients are summed (each loss scaled by 1/grad_accum) before
    one AdamW step, so an inner step trains on data.batch_size x island.ranks x grad_accum
    sequences."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "inner.lr", "> 0", self.lr)
        require(self.warmup_steps >= 0, "inner.warmup_steps", ">= 0", self.warmup_steps)
        require(0 <= self.min_lr_ratio <= 1, "inner.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        require(self.weight_decay >= 0, "inner.weight_decay", ">= 0", self.weight_decay)
        require(0 <= self.beta1 < 1, "inner.beta1", "in [0, 1)", self.beta1)
        require(0 <= self.beta2 < 1, "inner.beta2", "in [0, 1)", self.beta2)
        require(self.grad_clip >= 0, "inner.grad_clip", ">= 0", self.grad_clip)
        require(self.grad_accum >= 1, "inner.grad_accum", ">= 1", self.grad_accum)
