"""How a coordinator combines the islands' decoded pseudo-gradients: pure functions.

`weighted_mean` is DiLoCo's average (weights: tokens). `coordinate_median` and
`trimmed_mean` are the robust aggregates for semi-trusted sites: per coordinate, unweighted,
so one island's extreme values cannot drag the result (Yin et al. 2018,
https://arxiv.org/abs/1803.01498). `clip_to_norm` bounds how far one island can move it.
Every result is fp32 and depends on the order of `deltas` only through the float sums of
`weighted_mean` (callers pass them in rank order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i d_i / sum_i w_i, summed in fp32 in the given order."""
    if not deltas:
        raise ValueError("nothing to average")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} tensors but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    mean = deltas[0].to(torch.float32) * (weights[0] / total)
    for delta, weight in zip(deltas[1:], weights[1:], strict=True):
        mean.add_(delta.to(torch.float32), alpha=weight / total)
    return mean


def coordinate_median(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-coordinate median; with an even count, the mean of the two middle values."""
    stacked = torch.stack([d.to(torch.float32) for d in deltas])
    sorted_values = stacked.sort(dim=0).values
    count = len(deltas)
    middle = count // 2
    if count % 2:
        return sorted_values[middle].clone()
    return (sorted_values[middle - 1] + sorted_values[middle]) / 2


def trimmed_mean(deltas: Sequence[torch.Tensor], trim_fraction: float) -> torch.Tensor:
    """Per coordinate: drop the floor(trim_fraction * n) smallest and largest, average the rest."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    count = len(deltas)
    trim = int(trim_fraction * count)
    stacked = torch.stack([d.to(torch.float32) for d in deltas])
    if trim == 0:
        return stacked.mean(dim=0)
    kept = stacked.sort(dim=0).values[trim : count - trim]
    return kept.mean(dim=0)


def clip_to_norm(delta: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`delta` scaled down to L2 norm `max_norm` when it is longer (0: unchanged)."""
    if max_norm <= 0:
        return delta
    norm = float(torch.linalg.vector_norm(delta.to(torch.float32)))
    if norm <= max_norm:
        return delta
    return delta * (max_norm / norm)
