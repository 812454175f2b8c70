"""Which part of the island's parameters this rank syncs, and how the new anchor gets back in.

An island of N ranks syncs its flat pseudo-gradient in N shards: rank r owns shard r (its
anchor, outer optimizer state and residual) and averages it with shard r of the other islands
(DESIGN.md, "Islands of many ranks"). `OuterSync` sees only a `ParamShard`:

- `WholeParams`: one rank per island: the shard is every parameter (today's path).
- `SlicedParams`: ranks that each hold every parameter (DDP): shard r is the r-th contiguous
  slice of the flat vector; after the outer step the island's ranks all-gather the new slices.
- `WholeParams` over FSDP2's local shards: each rank holds only its own slice of every
  parameter, so its shard is just those (no gather, and ~1/N of the anchor and state per rank).

`island_sha256` combines the ranks' shard digests in rank order (a collective over the island's
ranks): equal on every island when their anchors are, whatever N.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from diloco.outer.pseudo_gradient import copy_flat_into_, flatten_params, pseudo_gradient


@runtime_checkable
class ParamShard(Protocol):
    """This rank's part of the island's parameters, as one flat fp32 vector."""

    def read(self) -> torch.Tensor:
        """A new flat fp32 copy of this rank's shard of the current parameters."""
        ...

    def write_(self, anchor_N: torch.Tensor) -> None:
        """Make the island's parameters hold `anchor_N` (this rank's shard of the anchor)."""
        ...

    def pseudo_gradient(
        self, anchor_N: torch.Tensor, out_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`anchor_N` minus this rank's shard of the current parameters: written into `out_N`
        (fp32, the anchor's size) and returned, or into a new flat vector."""
        ...

    def island_sha256(self, shard_sha256: str) -> str:
        """The hash of the island's whole anchor from every rank's shard hash (a collective
        when the island has several ranks)."""
        ...


class WholeParams:
    """Every parameter this rank holds is its shard (one rank, or FSDP2's local shards).

    Args:
        params: the tensors, in an order identical on every island.
        group: the island's process group when it has several ranks (the hash combines theirs).
    """

    def __init__(self, params: Sequence[torch.Tensor], group: Any = None):
        self.params = list(params)
        self.group = group

    def read(self) -> torch.Tensor:
        return flatten_params(self.params)

    def write_(self, anchor_N: torch.Tensor) -> None:
        copy_flat_into_(self.params, anchor_N)

    @torch.no_grad()
    def pseudo_gradient(
        self, anchor_N: torch.Tensor, out_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Each parameter is subtracted straight into its slice of the result: no flat copy of
        # the parameters first (a model's size of memory at every sync, issue 14).
        delta_N = torch.empty_like(anchor_N) if out_N is None else out_N
        offset = 0
        for p in self.params:
            n = p.numel()
            torch.sub(
                anchor_N[offset : offset + n], p.reshape(-1), out=delta_N[offset : offset + n]
            )
            offset += n
        assert offset == anchor_N.numel(), (
            f"anchor has {anchor_N.numel()} elements, params {offset}"
        )
        return delta_N

    def island_sha256(self, shard_sha256: str) -> str:
        return combine_shard_hashes(shard_sha256, self.group)


class SlicedParams:
    """Replicated parameters (DDP): this rank's shard is slice `rank` of `ranks` of the flat
    vector; writing all-gathers every rank's new slice over `group`, the island's ranks."""

    def __init__(self, params: Sequence[torch.Tensor], *, rank: int, ranks: int, group: Any):
        self.params = list(params)
        self.rank, self.ranks, self.group = rank, ranks, group
        self.numel = sum(p.numel() for p in self.params)
        self.bounds = shard_bounds(self.numel, ranks)

    def read(self) -> torch.Tensor:
        start, end = self.bounds[self.rank]
        return flatten_params(self.params)[start:end].clone()

    def pseudo_gradient(
        self, anchor_N: torch.Tensor, out_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        start, end = self.bounds[self.rank]  # a view of the slice: `read`'s clone is not needed
        return pseudo_gradient(anchor_N, flatten_params(self.params)[start:end], out_N)

    def write_(self, anchor_N: torch.Tensor) -> None:
        size = max(end - start for start, end in self.bounds)
        mine = torch.zeros(size, dtype=torch.float32, device=anchor_N.device)
        mine[: anchor_N.numel()] = anchor_N
        gathered = torch.empty(size * self.ranks, dtype=torch.float32, device=anchor_N.device)
        dist.all_gather_into_tensor(gathered, mine, group=self.group)
        pieces = [
            gathered[r * size : r * size + end - start]
            for r, (start, end) in enumerate(self.bounds)
        ]
        copy_flat_into_(self.params, torch.cat(pieces))

    def island_sha256(self, shard_sha256: str) -> str:
        return combine_shard_hashes(shard_sha256, self.group)


def shard_bounds(numel: int, ranks: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's contiguous shard: sizes differ by at most one element."""
    base, extra = divmod(numel, ranks)
    bounds, start = [], 0
    for rank in range(ranks):
        end = start + base + (1 if rank < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def combine_shard_hashes(shard_sha256: str, group: Any) -> str:
    """sha256 over every rank's shard digest in rank order; a one-rank island's is its own."""
    if group is None or dist.get_world_size(group) == 1:
        return shard_sha256
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, shard_sha256, group=group)
    return hashlib.sha256("".join(everyone).encode()).hexdigest()
