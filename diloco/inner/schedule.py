"""The inner learning-rate schedule: linear warm-up, then cosine decay to a floor.

As in the DiLoCo paper's inner AdamW (1,000 warm-up steps, cosine decay); the step counts
inner steps over the whole run, across rounds.
"""

from __future__ import annotations

import math


def warmup_cosine_lr(
    step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """Learning rate of inner step `step` (0-based)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
