"""How the islands' decoded pseudo-gradients are combined into one: pure functions.

A leaf module, used by every transport that reduces (local, torch, the grpc coordinator).
`weighted_mean` is DiLoCo's average (weights: tokens). `coordinate_median` and `trimmed_mean`
are the robust aggregates for semi-trusted sites: per coordinate, unweighted, so one island's
extreme values cannot drag the result (Yin et al. 2018, https://arxiv.org/abs/1803.01498).
`clip_to_norm` bounds how far one island can move it. `AGGREGATES` names them for
`transport.aggregate`.

Every result is fp32. The bits of a float sum depend on the order of its terms: callers pass
the tensors in rank order, so every island that computes a mean of the same tensors gets the
same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def weighted_mean(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum(w_i * v_i) / sum(w_i), summed in fp32 in the given order.

    Each term is added with `add_(v_i, alpha=w_i / W)`, a fused multiply-add on CPUs that have
    one, into an accumulator that starts at zero: the one formula every transport uses.
    """
    if not vectors:
        raise ValueError("nothing to average")
    if len(vectors) != len(weights):
        raise ValueError(f"need one weight per vector, got {len(vectors)} and {len(weights)}")
    total = float(sum(weights))
    if not total > 0:  # also refuses a NaN total
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    mean = torch.zeros_like(vectors[0], dtype=torch.float32)
    for vector, weight in zip(vectors, weights, strict=True):
        mean.add_(vector.to(torch.float32), alpha=weight / total)
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


@dataclass(frozen=True)
class AggregateOptions:
    """What an aggregate may read besides the tensors and their weights."""

    trim_fraction: float = 0.2


AggregateFn = Callable[[Sequence[torch.Tensor], Sequence[float], AggregateOptions], torch.Tensor]

# The names of `transport.aggregate` (its enum in diloco/transports/config.py lists the same).
AGGREGATES: dict[str, AggregateFn] = {
    "mean": lambda deltas, weights, options: weighted_mean(deltas, weights),
    "median": lambda deltas, weights, options: coordinate_median(deltas),
    "trimmed_mean": lambda deltas, weights, options: trimmed_mean(deltas, options.trim_fraction),
}
