"""An island's whole shared vector from its ranks' shards (exports and tools read checkpoints).

Rank r of an island of R ranks checkpoints only its shard of the anchor (docs/multigpu.md):
- DDP (`SlicedParams`): shard r is the r-th contiguous slice of the flat vector, so the whole
  vector is the shards in rank order;
- FSDP2 (`local_parameters`): shard r is, for every parameter in order, its dim-0 chunk r as
  `torch.chunk` cuts it (ceil(d / R) rows each, the last ranks fewer or none), so the whole
  vector interleaves the ranks parameter by parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diloco.parallel.config import Parallelism


def fsdp_rows(rows: int, ranks: int) -> list[int]:
    """Rows of a dim-0 size `rows` that each of `ranks` ranks holds under FSDP2 (torch.chunk's
    split, padded with empty chunks when there are fewer rows than ranks)."""
    per_rank = -(-rows // ranks) if rows else 0  # ceil
    held = []
    for rank in range(ranks):
        start = min(rows, rank * per_rank)
        held.append(min(rows, start + per_rank) - start)
    return held


def stitch_island_anchor(
    parallel: Parallelism, shapes: Sequence[torch.Size], shards: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The island's flat vector, in parameter order, from its ranks' flat shards (rank order).

    Raises:
        ValueError: the shards do not add up to the shapes' elements.
    """
    total = sum(int(torch.Size(shape).numel()) for shape in shapes)
    if sum(shard.numel() for shard in shards) != total:
        raise ValueError(
            f"the ranks' shards hold {sum(s.numel() for s in shards)} elements, the "
            f"parameters {total}"
        )
    if parallel is not Parallelism.fsdp or len(shards) == 1:
        return torch.cat(list(shards))
    offsets = [0] * len(shards)
    pieces = []
    for shape in shapes:
        size = torch.Size(shape)
        row = int(size[1:].numel()) if len(size) > 0 else 1
        rows = fsdp_rows(int(size[0]) if len(size) > 0 else 1, len(shards))
        for rank, held in enumerate(rows):
            count = held * row
            pieces.append(shards[rank][offsets[rank] : offsets[rank] + count])
            offsets[rank] += count
    return torch.cat(pieces)
