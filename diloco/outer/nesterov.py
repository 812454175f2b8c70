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

STEP_CHUNK = 1 << 18
"""Elements stepped at once (1 MiB of fp32 per vector); a multiple of any SIMD width. Every
operation of the step runs on one chunk of the momentum, the mean and the anchor while they
sit in the cache, instead of a pass over each whole vector per operation: 0.74x the time at
25M elements on the 2-core box (44.7 to 33.0 ms; 4 MiB chunks 39.9 ms, 64 KiB 37.9 ms)."""


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
    # Same operations as torch.optim.SGD, so the two agree bit for bit, a chunk at a time: each
    # element goes through the same elementwise kernels either way, and chunks start at
    # multiples of STEP_CHUNK, so vectorised and scalar tails fall on the same elements as
    # unchunked. The Nesterov update is formed a chunk at a time too: the step allocates
    # STEP_CHUNK values, not a vector of N (a model's size of memory on a coordinator that
    # holds only the state, issue 14).
    for start in range(0, anchor_N.numel(), STEP_CHUNK):
        end = min(start + STEP_CHUNK, anchor_N.numel())
        momentum_n, mean_n = momentum_N[start:end], mean_delta_N[start:end]
        momentum_n.mul_(mu).add_(mean_n)
        update_n = mean_n.add(momentum_n, alpha=mu) if nesterov else momentum_n
        anchor_N[start:end].add_(update_n, alpha=-lr)
