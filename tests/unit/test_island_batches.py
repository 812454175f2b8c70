"""An island batch split over ranks and micro-batches: exactly the rows of a one-rank island,
in order, whatever the nesting of the inputs (diloco/parallel/batches.py, issue 13)."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from diloco.parallel.batches import (
    batch_rows,
    island_batch_size,
    rank_micro_batches,
    slice_rows,
)

B, T = 3, 5  # data.batch_size (per rank, per micro-batch), tokens per row


def island_tokens(ranks: int, grad_accum: int) -> torch.Tensor:
    """A generated island batch whose row i holds i in every column (easy to read back)."""
    rows = island_batch_size(B, ranks, grad_accum)
    return torch.arange(rows).repeat_interleave(T).view(rows, T)


def all_micro_batches(inputs: object, ranks: int, grad_accum: int) -> list[list[object]]:
    return [
        rank_micro_batches(inputs, island_rank=r, ranks=ranks, grad_accum=grad_accum)
        for r in range(ranks)
    ]


@pytest.mark.parametrize("ranks,grad_accum", [(1, 1), (2, 1), (1, 3), (2, 2), (4, 3)])
def test_rank_blocks_and_micro_batches_are_the_one_rank_rows_in_order(
    ranks: int, grad_accum: int
) -> None:
    """Rank r's micro-batch k is rows [(r*A + k) * b, (r*A + k + 1) * b): concatenated rank by
    rank and micro-batch by micro-batch they are the island batch, every row once."""
    tokens = island_tokens(ranks, grad_accum)
    split = all_micro_batches(tokens, ranks, grad_accum)
    assert [len(micro) for micro in split] == [grad_accum] * ranks
    for r, micro in enumerate(split):
        for k, part in enumerate(micro):
            first = (r * grad_accum + k) * B
            assert torch.equal(part[:, 0], torch.arange(first, first + B))
    joined = torch.cat([part for micro in split for part in micro])
    assert torch.equal(joined, tokens)


def test_rank_block_is_contiguous() -> None:
    """Each rank's micro-batches together are one contiguous block of the island batch."""
    tokens = island_tokens(ranks=2, grad_accum=3)
    for r, micro in enumerate(all_micro_batches(tokens, 2, 3)):
        block = torch.cat(micro)
        assert torch.equal(block, tokens[r * 3 * B : (r + 1) * 3 * B])


def test_nested_inputs_are_split_alike() -> None:
    """Tensors in dicts, lists, tuples and named tuples are cut to the same rows; other values
    (a label, a 0-d tensor) reach every micro-batch unchanged; containers keep their type."""
    Pair = namedtuple("Pair", "left right")
    tokens = island_tokens(ranks=2, grad_accum=2)
    mask = tokens % 2 == 0
    inputs = {
        "tokens": tokens,
        "extra": [tokens * 10, ("label", mask)],
        "pair": Pair(tokens + 1, torch.tensor(7.0)),
    }
    split = all_micro_batches(inputs, ranks=2, grad_accum=2)
    for r, micro in enumerate(split):
        for k, part in enumerate(micro):
            rows = slice(((r * 2) + k) * B, ((r * 2) + k + 1) * B)
            assert torch.equal(part["tokens"], tokens[rows])
            assert isinstance(part["extra"], list) and isinstance(part["extra"][1], tuple)
            assert torch.equal(part["extra"][0], tokens[rows] * 10)
            assert part["extra"][1][0] == "label"
            assert torch.equal(part["extra"][1][1], mask[rows])
            assert isinstance(part["pair"], Pair)
            assert torch.equal(part["pair"].left, tokens[rows] + 1)
            assert part["pair"].right.item() == 7.0


def test_micro_batches_are_views() -> None:
    """Splitting copies nothing: each micro-batch is a view of the island batch."""
    tokens = island_tokens(ranks=2, grad_accum=1)
    part = rank_micro_batches(tokens, island_rank=1, ranks=2, grad_accum=1)[0]
    assert part.untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr()


def test_rows_that_do_not_split_evenly_are_refused() -> None:
    """An island batch of 7 rows cannot feed 2 ranks x 2 micro-batches: the error names the
    keys."""
    with pytest.raises(ValueError, match=r"7 rows .* island\.ranks=2 x inner\.grad_accum=2"):
        rank_micro_batches(torch.zeros(7, 4), island_rank=0, ranks=2, grad_accum=2)


def test_tensors_that_disagree_on_rows_are_refused() -> None:
    """Every tensor of the inputs must have the island batch's rows (dim 0)."""
    with pytest.raises(ValueError, match=r"agree on dim 0 .* sizes \[4, 6\]"):
        batch_rows({"a": torch.zeros(4, 2), "b": torch.zeros(6)})
    with pytest.raises(ValueError, match="no tensor"):
        batch_rows(["text"])


def test_rank_outside_the_island_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 2 of 2"):
        rank_micro_batches(torch.zeros(4, 2), island_rank=2, ranks=2, grad_accum=1)


def test_island_batch_size_and_slice_rows() -> None:
    assert island_batch_size(8, 4, 2) == 64
    assert slice_rows("label", 0, 1) == "label"
    assert torch.equal(slice_rows(torch.arange(6), 2, 4), torch.tensor([2, 3]))
