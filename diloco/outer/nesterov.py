"""The outer step: SGD with (Nesterov) momentum on the averaged pseudo-gradient.

Same update as `torch.optim.SGD(lr, momentum=mu, nesterov=...)` with dampening 0 and a
zero-initialised buffer (torch's first step sets buf = g, which is mu * 0 + g):
    buf = mu * buf + g
    update = g + mu * buf   (Nesterov)   or   buf   (heavy ball)
    anchor -= lr * update
DiLoCo found lr 0.7, mu 0.9, Nesterov best: https://arxiv.org/abs/2311.08105 (Sec. 3).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def nesterov_step_(
    anchor_N: torch.Tensor,
    mean_delta_N: torch.Tensor,
    momentum_N: torch.Tensor,
    *,
    lr: float,
    mu: float,
    nesterov: bool = True,
) -> None:
    """Apply one outer step to `anchor_N` and `momentum_N` in place."""
    if mu == 0.0:
        anchor_N.add_(mean_delta_N, alpha=-lr)
        return
    momentum_N.mul_(mu).add_(mean_delta_N)
    # Same operation order as torch.optim.SGD, so the two agree bit for bit.
    update_N = mean_delta_N.add(momentum_N, alpha=mu) if nesterov else momentum_N
    anchor_N.add_(update_N, alpha=-lr)
