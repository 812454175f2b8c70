"""Streaming DiLoCo's fragments: which tensors sync together, and when (pure functions).

Streaming DiLoCo (Douillard et al. 2025, https://arxiv.org/abs/2501.18512) splits the shared
parameters into P fragments of whole tensors and syncs them on a staggered schedule, so only
one fragment is on the wire at a time and each exchange overlaps the next tau inner steps.

- `assign_fragments`: whole tensors, balanced by size, in a fixed order (each tensor goes to
  the lightest fragment so far). For a transformer this stripes the blocks across fragments,
  close to the paper's strided assignment.
- `sync_offset`: within every period of H inner steps, fragment p starts its sync after
  `H - (P - 1 - p) * (H // P)` steps, so the last fragment syncs at the period's end (with P = 1:
  at step H, the blocking round) and the others are spread before it.
"""

from __future__ import annotations

from collections.abc import Sequence


def assign_fragments(sizes: Sequence[int], count: int) -> list[list[int]]:
    """The tensor indices of each of `count` fragments (each non-empty, in tensor order).

    Raises:
        ValueError: more fragments than tensors.
    """
    if not 1 <= count <= len(sizes):
        raise ValueError(f"cannot split {len(sizes)} tensors into {count} fragments")
    totals = [0] * count
    members: list[list[int]] = [[] for _ in range(count)]
    for index, size in enumerate(sizes):
        # The first `count` tensors seed one fragment each, so none is left empty.
        target = index if index < count else min(range(count), key=lambda p: (totals[p], p))
        members[target].append(index)
        totals[target] += size
    return members


def sync_offset(fragment: int, count: int, inner_steps: int) -> int:
    """Inner steps into each period of `inner_steps` at which `fragment` starts its sync."""
    spacing = inner_steps // count
    return inner_steps - (count - 1 - fragment) * spacing


def syncs_at(step: int, count: int, inner_steps: int) -> list[int]:
    """The fragments whose sync starts after inner step `step` (1-based, cumulative)."""
    into_period = (step - 1) % inner_steps + 1
    return [p for p in range(count) if sync_offset(p, count, inner_steps) == into_period]
