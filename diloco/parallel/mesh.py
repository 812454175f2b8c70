"""The island mesh: which processes form an island, and which hold the same shard of every island.

A torch.distributed world holds `islands_in_world` islands of `R` ranks each, island-major:
world rank `i * R + r` is rank `r` of island `i`. Two families of process groups follow:
the *island group* (the R ranks of one island: DDP or FSDP2 run over it) and, when several
islands share one world (the torch transport), the *shard group* of index r (rank r of every
island: the islands' shard r is averaged over it). This is the 2-D mesh of HSDP
(https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html), replicate dimension =
islands, shard dimension = the island's ranks, built from explicit groups because the
replicate dimension is DiLoCo's outer loop, not a per-step all-reduce. Issue 13.

`resolve_mesh` is pure (the numbers and the user's mistakes); `build_mesh` creates the groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diloco.errors import ConfigError
from diloco.parallel.config import Parallelism

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IslandLayout:
    """Where this process sits: its world, its island and its rank in the island."""

    world_rank: int
    """This process's rank in its torch.distributed world (torchrun's RANK; 0 without one)."""
    world_size: int
    """Processes in the world (torchrun's WORLD_SIZE; 1 without one)."""
    island: int
    """This island's index in the group, in [0, num_islands)."""
    num_islands: int
    """Islands in the whole group (transport.islands)."""
    islands_in_world: int
    """Islands this world holds: num_islands when they share one world (torch transport), 1
    when each island is its own world (grpc, hivemind)."""
    ranks_per_island: int
    """R: processes per island (island.ranks as launched)."""
    island_rank: int
    """r: this process's rank in its island, in [0, R); it owns shard r of the outer sync."""
    parallel: Parallelism
    """How the island's ranks share the inner loop."""

    def island_world_ranks(self, index_in_world: int) -> list[int]:
        """World ranks of the island at `index_in_world` (0 when each island is its own world)."""
        first = index_in_world * self.ranks_per_island
        return list(range(first, first + self.ranks_per_island))

    def shard_world_ranks(self, shard: int) -> list[int]:
        """World ranks holding shard `shard`: rank `shard` of every island of this world."""
        return [i * self.ranks_per_island + shard for i in range(self.islands_in_world)]


def resolve_mesh(
    *,
    world_size: int,
    world_rank: int,
    num_islands: int,
    islands_share_world: bool,
    configured_ranks: int,
    parallel: Parallelism,
    hosts_every_island: bool = False,
    island: int = 0,
) -> IslandLayout:
    """This process's layout from what was launched and what was configured.

    Args:
        world_size: torchrun's WORLD_SIZE (1 when not launched by torchrun).
        world_rank: torchrun's RANK (0 when not launched by torchrun).
        num_islands: transport.islands.
        islands_share_world: every island of the group lives in this one world (the torch
            transport: islands x island.ranks processes); false when each island is its own
            world (grpc, hivemind).
        configured_ranks: island.ranks (0: derive it from the world).
        parallel: island.parallel.
        hosts_every_island: the transport runs every island in this one process (local).
        island: this island's index when it is its own world (transport.rank); unused when
            the islands share one world (derived from the world rank there).

    Raises:
        ConfigError: the launch and the config disagree (one line naming the key).
    """
    if not 0 <= world_rank < world_size:
        raise ValueError(f"world rank {world_rank} is outside a world of {world_size}")
    if hosts_every_island:
        return _hosted_layout(num_islands, configured_ranks, parallel)
    islands_in_world = num_islands if islands_share_world else 1
    ranks = _launched_ranks(world_size, islands_in_world, configured_ranks, parallel)
    if islands_share_world:
        island = world_rank // ranks
    elif not 0 <= island < num_islands:
        raise ValueError(f"island {island} is outside a group of {num_islands}")
    return IslandLayout(
        world_rank=world_rank,
        world_size=world_size,
        island=island,
        num_islands=num_islands,
        islands_in_world=islands_in_world,
        ranks_per_island=ranks,
        island_rank=world_rank % ranks,
        parallel=parallel,
    )


def _launched_ranks(
    world_size: int, islands_in_world: int, configured_ranks: int, parallel: Parallelism
) -> int:
    """R as launched (WORLD_SIZE / islands in the world), checked against the config."""
    launched = f"WORLD_SIZE={world_size}"
    if islands_in_world > 1:
        if world_size % islands_in_world:
            raise ConfigError(
                f"transport.islands must divide the {launched} processes launched "
                f"(islands x island.ranks), got {islands_in_world}"
            )
        launched += f" / transport.islands={islands_in_world}"
    ranks = world_size // islands_in_world
    if configured_ranks and configured_ranks != ranks:
        raise ConfigError(
            f"island.ranks must match the {ranks} ranks per island launched ({launched}), "
            f"got {configured_ranks}"
        )
    if parallel is Parallelism.none and ranks > 1:
        raise ConfigError(
            f"island.parallel must be ddp or fsdp with {ranks} ranks per island ({launched}), "
            "got none"
        )
    return ranks


def _hosted_layout(num_islands: int, configured_ranks: int, parallel: Parallelism) -> IslandLayout:
    """The layout of a process that runs every island in turn (the local transport)."""
    if configured_ranks > 1:
        raise ConfigError(
            "island.ranks must be 1 with a transport.kind that runs every island in one "
            f"process (local), got {configured_ranks}"
        )
    if parallel is not Parallelism.none:
        log.warning(
            "island.parallel=%s has no effect when every island runs in one process "
            "(one rank per island)",
            parallel.value,
        )
    return IslandLayout(
        world_rank=0,
        world_size=1,
        island=0,
        num_islands=num_islands,
        islands_in_world=num_islands,
        ranks_per_island=1,
        island_rank=0,
        parallel=Parallelism.none,
    )


@dataclass(frozen=True)
class IslandMesh:
    """An island's layout and its process groups (None where it needs none)."""

    layout: IslandLayout
    island_group: dist.ProcessGroup | None
    """The island's R ranks (DDP and FSDP2 run over it); None with island.parallel=none."""
    shard_group: dist.ProcessGroup | None
    """Rank r of every island of this world (the torch transport averages shard r over it);
    None when the islands do not share a world, or with one rank per island (the world is
    then that group already)."""
    device_type: str
    """"cpu" or "cuda": where the groups' collectives run (gloo or nccl)."""


def backend_for(device: torch.device) -> str:
    """gloo on the CPU, nccl on CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


def build_mesh(layout: IslandLayout, device: torch.device) -> IslandMesh:
    """Create the island's process groups (a collective call: every process of the world
    calls it with its own layout, and creates every group of the world in the same order).

    With island.parallel=none no group is created (one rank per island: the path of one
    process per island). Otherwise torch.distributed must already be initialized over the
    whole world (a lone process: a world of one, e.g. `init_process_group(backend,
    store=dist.HashStore(), rank=0, world_size=1)`).
    """
    if layout.parallel is Parallelism.none:
        return IslandMesh(layout, island_group=None, shard_group=None, device_type=device.type)
    if not dist.is_initialized():
        raise RuntimeError(
            f"island.parallel={layout.parallel.value} needs torch.distributed initialized over "
            f"the world of {layout.world_size} process(es) before build_mesh"
        )
    if (dist.get_rank(), dist.get_world_size()) != (layout.world_rank, layout.world_size):
        raise RuntimeError(
            f"the process group is rank {dist.get_rank()} of {dist.get_world_size()}, the "
            f"layout rank {layout.world_rank} of {layout.world_size}"
        )
    backend = backend_for(device)
    island_group = _own_group(
        [layout.island_world_ranks(i) for i in range(layout.islands_in_world)], layout, backend
    )
    shard_group = None
    if layout.islands_in_world > 1 and layout.ranks_per_island > 1:
        shard_group = _own_group(
            [layout.shard_world_ranks(r) for r in range(layout.ranks_per_island)], layout, backend
        )
    log.info(
        "island %d of %d: rank %d of %d (%s), world rank %d of %d",
        layout.island,
        layout.num_islands,
        layout.island_rank,
        layout.ranks_per_island,
        layout.parallel.value,
        layout.world_rank,
        layout.world_size,
    )
    return IslandMesh(layout, island_group, shard_group, device_type=device.type)


def _own_group(
    groups_ranks: list[list[int]], layout: IslandLayout, backend: str
) -> dist.ProcessGroup:
    """Create every group of `groups_ranks` (each process must create all of them, in the
    same order: `new_group` is collective over the world) and return this process's."""
    own: dist.ProcessGroup | None = None
    for ranks in groups_ranks:
        group: dist.ProcessGroup = dist.new_group(ranks, backend=backend)
        if layout.world_rank in ranks:
            own = group
    assert own is not None, f"world rank {layout.world_rank} is in none of {groups_ranks}"
    return own
