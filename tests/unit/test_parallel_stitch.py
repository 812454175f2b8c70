"""Reassembling an island's vector from its ranks' shards (export of a multi-rank island)."""

from __future__ import annotations

import pytest
import torch

from diloco.outer.shards import shard_bounds
from diloco.parallel.config import Parallelism
from diloco.parallel.stitch import fsdp_rows, stitch_island_anchor

SHAPES = [torch.Size([61, 8]), torch.Size([8]), torch.Size([1, 3]), torch.Size([5, 2, 2])]


def _params() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


@pytest.mark.parametrize(("rows", "ranks", "held"), [(61, 2, [31, 30]), (8, 3, [3, 3, 2]),
                                                     (1, 2, [1, 0]), (5, 4, [2, 2, 1, 0]),
                                                     (4, 4, [1, 1, 1, 1])])  # fmt: skip
def test_fsdp_rows_are_torch_chunks(rows: int, ranks: int, held: list[int]) -> None:
    assert fsdp_rows(rows, ranks) == held
    chunks = [c.shape[0] for c in torch.chunk(torch.arange(rows), ranks)]
    assert held[: len(chunks)] == chunks and sum(held) == rows


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_fsdp_shards_stitch_back_to_the_whole_vector(ranks: int) -> None:
    params = _params()
    shards = []
    for rank in range(ranks):
        pieces = []
        for param in params:
            chunks = list(torch.chunk(param, ranks, dim=0))
            piece = chunks[rank] if rank < len(chunks) else param[:0]
            pieces.append(piece.reshape(-1))
        shards.append(torch.cat(pieces))
    whole = torch.cat([p.reshape(-1) for p in params])
    assert torch.equal(stitch_island_anchor(Parallelism.fsdp, SHAPES, shards), whole)


def test_ddp_slices_stitch_back_in_rank_order() -> None:
    whole = torch.cat([p.reshape(-1) for p in _params()])
    shards = [whole[a:b] for a, b in shard_bounds(whole.numel(), 3)]
    assert torch.equal(stitch_island_anchor(Parallelism.ddp, SHAPES, shards), whole)


def test_shards_that_do_not_add_up_are_refused() -> None:
    with pytest.raises(ValueError, match="shards hold"):
        stitch_island_anchor(Parallelism.fsdp, SHAPES, [torch.zeros(3)])
