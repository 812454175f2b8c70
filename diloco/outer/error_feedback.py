"""Error feedback: what the codec lost this round is added to the next round's pseudo-gradient.

Each island keeps a residual e (zeros at first) and sends codec(delta + e) instead of
codec(delta), then keeps e = (delta + e) - decode(payload). Over rounds the sum of what was
sent follows the sum of what was meant to within one residual, which stays bounded, so a
lossy codec's error does not accumulate in the shared parameters. Seide et al. 2014 (1-bit
SGD); for DiLoCo-style pseudo-gradients with top-k, SparseLoCo:
https://arxiv.org/abs/2508.15706. Streaming DiLoCo sends fp4 without it
(https://arxiv.org/abs/2501.18512).
"""

from __future__ import annotations

import torch


def compensate(delta_N: torch.Tensor, residual_N: torch.Tensor, decay: float = 1.0) -> torch.Tensor:
    """The tensor to encode this round: the pseudo-gradient plus what earlier rounds lost,
    scaled by `decay` (beta; 1 is classic error feedback)."""
    if decay == 1.0:
        return delta_N + residual_N
    return delta_N + decay * residual_N


def new_residual(target_N: torch.Tensor, decoded_N: torch.Tensor) -> torch.Tensor:
    """What this round's payload failed to carry: target - decode(encode(target))."""
    return target_N - decoded_N
