"""Each hosted island's replica of the model, wrapped for its ranks, and this rank's shard of it.

One rank per island: the replica itself, and every parameter is the shard. An island of R
ranks (issue 13): DDP or FSDP2 over the island's group (`diloco.parallel.wrap`), and rank r
syncs shard r of the island's parameters with shard r of the other islands:
DDP a contiguous 1/R slice of the flat vector (`SlicedParams`, all-gathered after the outer
step), FSDP2 the parameter shards this rank already holds (`WholeParams` over
`local_parameters`: no gather, ~1/R of the anchor and outer state per rank).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from diloco.config import IslandConfig
from diloco.errors import ConfigError
from diloco.inner.compile import compile_inner_model
from diloco.outer.shards import ParamShard, SlicedParams, WholeParams, shard_bounds
from diloco.parallel.config import Parallelism
from diloco.parallel.wrap import local_parameters, wrap_model
from islands.ranks import IslandRanks


@dataclass(frozen=True)
class Replica:
    """One hosted island's model in its three roles."""

    model: nn.Module
    """The model the island owns (FSDP2: sharded in place; DDP: the module inside the
    wrapper); data selection and evaluation call it."""
    inner_model: nn.Module
    """What the inner loop calls: the DDP wrapper and / or torch.compile around `model`."""
    shard: ParamShard
    """This rank's part of the island's parameters for the outer sync."""

    shard_numel: int
    """Elements of this rank's shard (what its transport exchanges each round)."""


def build_replica(
    config: IslandConfig, prototype: nn.Module, ranks: IslandRanks, device: torch.device
) -> Replica:
    """A copy of `prototype` on `device`, wrapped for the island's ranks (collective over the
    island when it has several: every rank builds its replica the same way)."""
    model = copy.deepcopy(prototype).to(device)
    parallel = ranks.layout.parallel
    wrapped = wrap_model(model, ranks.mesh, device)
    inner_model = compile_inner_model(wrapped, config.run.compile)  # shares model's parameters
    shard: ParamShard
    if parallel is Parallelism.ddp and ranks.count > 1:
        params = list(model.parameters())
        shard = SlicedParams(params, rank=ranks.rank, ranks=ranks.count, group=ranks.group)
        start, end = shard_bounds(sum(p.numel() for p in params), ranks.count)[ranks.rank]
        numel = end - start
    else:
        owned = local_parameters(model) if parallel is Parallelism.fsdp else model.parameters()
        tensors = list(owned)
        shard = WholeParams(tensors, group=ranks.group)
        numel = sum(t.numel() for t in tensors)
    return Replica(model=model, inner_model=inner_model, shard=shard, shard_numel=numel)


def streamed_shard(config: IslandConfig, replica: Replica) -> list[torch.Tensor]:
    """What this rank streams of each fragment (Streaming DiLoCo), in parameter order: every
    parameter with one rank per island; FSDP2's local shards of each on an island of several.

    Raises:
        ConfigError: streaming on a DDP island of several ranks (its ranks hold whole
            replicas: use island.parallel=fsdp, whose ranks each stream the shards they hold).
    """
    if not isinstance(replica.shard, WholeParams):
        raise ConfigError(
            "outer.fragments / outer.overlap_steps (streaming) with island.ranks > 1 need "
            f"island.parallel=fsdp (each rank streams the shards it holds), got "
            f"{config.island.parallel.value}"
        )
    return replica.shard.params
