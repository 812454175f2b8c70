"""Pseudo-gradients: where the round started minus where an island is now.

All shared state travels as one flat fp32 vector (`_N` = number of shared elements), so that
codecs, transports and the outer optimizer see a single buffer whatever the model.
DiLoCo, Douillard et al. 2023, Algorithm 1: https://arxiv.org/abs/2311.08105
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def flatten_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A new flat fp32 copy of `params`, in order."""
    if not params:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])


@torch.no_grad()
def copy_flat_into_(params: Sequence[torch.Tensor], flat_N: torch.Tensor) -> None:
    """Write the flat vector back into the parameters, in place."""
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat_N[offset : offset + n].view_as(p))
        offset += n
    assert offset == flat_N.numel(), f"flat vector has {flat_N.numel()} elements, params {offset}"


def pseudo_gradient(
    anchor_N: torch.Tensor, local_N: torch.Tensor, out_N: torch.Tensor | None = None
) -> torch.Tensor:
    """anchor - local: the direction the outer optimizer treats as a gradient (written into
    `out_N` when given: a payload's body, for codec none)."""
    if out_N is None:
        return anchor_N - local_N
    return torch.sub(anchor_N, local_N, out=out_N)
