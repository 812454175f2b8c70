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

STEP_CHUNK = 1 << 20
"""Elements of the Nesterov update formed at once (4 MiB of fp32); a multiple of any SIMD width."""


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
    if not nesterov:
        anchor_N.add_(momentum_N, alpha=-lr)
        return
    # Same operations as torch.optim.SGD, so the two agree bit for bit; the update vector is
    # formed a chunk at a time, so the step allocates STEP_CHUNK values, not a vector of N (a
    # model's size of memory on a coordinator that holds only the state, issue 14). Each element
    # goes through the same elementwise kernels either way, and chunks start at multiples of
    # STEP_CHUNK, so vectorised and scalar tails fall on the same elements as unchunked.
    for start in range(0, anchor_N.numel(), STEP_CHUNK):
        end = min(start + STEP_CHUNK, anchor_N.numel())
        update = mean_delta_N[start:end].add(momentum_N[start:end], alpha=mu)
        anchor_N[start:end].add_(update, alpha=-lr)
