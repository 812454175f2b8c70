"""The island's batch, split over its ranks and micro-batches so that the maths do not change.

`data.batch_size` is per rank and per micro-batch. One inner step of an island of R ranks with
`inner.grad_accum` = A trains on the windows a one-rank island with batch_size x R x A takes:
every rank of the island draws that whole island batch from the island's stream (the same
seed, so the same rows), and rank r keeps its contiguous block of rows
[r * b * A, (r + 1) * b * A), cut into A micro-batches of b rows, in order. The mean of the
micro-batch losses averaged over the ranks is then the island batch's mean loss, and a run's
maths do not depend on how the island batch is split (issue 13). The island's weight in the
outer average stays the island batch's `num_tokens`.
"""

from __future__ import annotations

from typing import Any

import torch


def island_batch_size(batch_size: int, ranks: int, grad_accum: int) -> int:
    """Rows of one inner step of the whole island: data.batch_size x island.ranks x
    inner.grad_accum (the batch size of the island's data source)."""
    return batch_size * ranks * grad_accum


def rank_micro_batches(inputs: Any, *, island_rank: int, ranks: int, grad_accum: int) -> list[Any]:
    """The inputs of rank `island_rank`'s micro-batches of one island batch, in order.

    Args:
        inputs: one inner step's island batch (`Batch.inputs`: island_batch_size rows along
            dim 0 of every tensor: a tensor, or lists, tuples and dicts of them; other values
            are passed to every micro-batch as they are).
        island_rank: r, this process's rank in the island.
        ranks: R, the island's ranks.
        grad_accum: A, micro-batches per inner step.

    Raises:
        ValueError: the batch's rows are not a multiple of R x A, or its tensors disagree on
            their number of rows.
    """
    if not 0 <= island_rank < ranks or grad_accum < 1:
        raise ValueError(f"rank {island_rank} of {ranks}, grad_accum {grad_accum}")
    rows = batch_rows(inputs)
    parts = ranks * grad_accum
    if rows % parts:
        raise ValueError(
            f"an island batch of {rows} rows does not split into island.ranks={ranks} x "
            f"inner.grad_accum={grad_accum} equal micro-batches (data.batch_size each)"
        )
    micro_rows = rows // parts
    first = island_rank * grad_accum
    return [
        slice_rows(inputs, (first + k) * micro_rows, (first + k + 1) * micro_rows)
        for k in range(grad_accum)
    ]


def batch_rows(inputs: Any) -> int:
    """The number of rows (dim 0) shared by every tensor of `inputs`."""
    sizes = {tensor.shape[0] for tensor in _tensors(inputs)}
    if len(sizes) != 1:
        raise ValueError(
            "a batch's tensors must agree on dim 0 (rows) to be split, got "
            + (f"sizes {sorted(sizes)}" if sizes else "no tensor")
        )
    return sizes.pop()


def slice_rows(inputs: Any, begin: int, end: int) -> Any:
    """`inputs` with every tensor cut to rows [begin, end) (views, no copy; 0-d tensors and
    other values as they are)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[begin:end] if inputs.dim() > 0 else inputs
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):  # a named tuple
        return type(inputs)(*(slice_rows(item, begin, end) for item in inputs))
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(slice_rows(item, begin, end) for item in inputs)
    if isinstance(inputs, dict):
        return {key: slice_rows(value, begin, end) for key, value in inputs.items()}
    return inputs


def _tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs] if inputs.dim() > 0 else []
    if isinstance(inputs, (list, tuple)):
        return [t for item in inputs for t in _tensors(item)]
    if isinstance(inputs, dict):
        return [t for value in inputs.values() for t in _tensors(value)]
    return []
