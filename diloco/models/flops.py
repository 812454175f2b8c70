"""How many FLOPs training a model costs per token (JEST weighs selection against it)."""

from __future__ import annotations

from torch import nn


def train_flops_per_token(model: nn.Module) -> int:
    """Training FLOPs per token: the model's own `flops_per_token()`, else 6 N (forward and
    backward of N parameters; Kaplan et al. 2020, https://arxiv.org/abs/2001.08361)."""
    flops = getattr(model, "flops_per_token", None)
    if callable(flops):
        return int(flops())
    return 6 * sum(p.numel() for p in model.parameters())
