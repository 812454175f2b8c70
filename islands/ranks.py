"""Where this process sits: its island, its rank in the island, and the island's collectives.

An island is a torchrun group of `island.ranks` processes (issue 13). This module turns what
was launched (torchrun's RANK / WORLD_SIZE, or none) and the config into the island's mesh
(`diloco.parallel.mesh`), starts torch.distributed when the mesh needs it, and gives the rest
of the runtime the few collectives it runs over the island's ranks: summing figures for the
island's one metrics row, agreeing on checkpoints, waiting for rank 0's file moves.

Launch rules (docs/transports.md):
- torch transport: one world of transport.islands x island.ranks processes, island-major
  (world rank i * R + r is rank r of island i);
- grpc and hivemind: every island is its own world (its own torchrun); WORLD_SIZE is the
  island's ranks and the island's index comes from transport.rank;
- local: every island in this process, one rank each.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from diloco.config import IslandConfig
from diloco.errors import ConfigError
from diloco.parallel.config import Parallelism
from diloco.parallel.mesh import IslandLayout, IslandMesh, backend_for, build_mesh, resolve_mesh
from diloco.transports.base import BuiltTransports, TransportSetup
from diloco.transports.config import TransportKind, hosts_every_island

log = logging.getLogger(__name__)

T = TypeVar("T")


def launch_layout(config: IslandConfig) -> IslandLayout:
    """This process's place from torchrun's environment and the config.

    Raises:
        ConfigError: the launch and the config disagree (one line naming the key).
    """
    transport = config.transport
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    world_rank = int(os.environ.get("RANK", "0"))
    kind = transport.kind
    if hosts_every_island(kind):
        return resolve_mesh(
            world_size=1,
            world_rank=0,
            num_islands=transport.islands,
            islands_share_world=True,
            configured_ranks=config.island.ranks,
            parallel=config.island.parallel,
            hosts_every_island=True,
        )
    share_world = kind is TransportKind.torch
    if share_world and "WORLD_SIZE" not in os.environ:
        # Without torchrun: one rank per island, its index from transport.rank.
        world_size, world_rank = transport.islands, _island_index(config)
    layout = resolve_mesh(
        world_size=world_size,
        world_rank=world_rank,
        num_islands=transport.islands,
        islands_share_world=share_world,
        configured_ranks=config.island.ranks,
        parallel=config.island.parallel,
        island=0 if share_world else _island_index(config),
    )
    if share_world and transport.rank >= 0 and transport.rank != layout.island:
        raise ConfigError(
            f"transport.rank must match the island torchrun's RANK={world_rank} places this "
            f"process in ({layout.island}), got {transport.rank}"
        )
    return layout


def _island_index(config: IslandConfig) -> int:
    transport = config.transport
    if transport.rank >= 0:
        return transport.rank
    if transport.kind is TransportKind.torch and "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "WORLD_SIZE" in os.environ:
        raise ConfigError(
            f"transport.rank is not set: with transport.kind {transport.kind.value} every "
            "island is its own torchrun (RANK is the rank inside the island): give "
            "transport.rank=<0..islands-1>"
        )
    raise ConfigError(
        "transport.rank is not set and RANK is not in the environment: start with torchrun "
        "or give transport.rank=<0..islands-1>"
    )


@dataclass
class IslandRanks:
    """This process's island mesh and the collectives the runtime runs over its ranks.

    With one rank per island every method is a no-op or the identity, with no collective.
    """

    mesh: IslandMesh
    owns_world: bool = False
    """This process started torch.distributed (and so ends it in `close`)."""

    @property
    def layout(self) -> IslandLayout:
        return self.mesh.layout

    @property
    def rank(self) -> int:
        """r: this process's rank in its island (it owns shard r of the outer sync)."""
        return self.layout.island_rank

    @property
    def count(self) -> int:
        """R: the island's ranks."""
        return self.layout.ranks_per_island

    @property
    def writes_outputs(self) -> bool:
        """Only rank 0 of an island writes its metrics, summary, plots and fingerprint."""
        return self.rank == 0

    @property
    def group(self) -> Any:
        """The island's process group (None with one rank)."""
        return self.mesh.island_group if self.count > 1 else None

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the island's ranks (the same answer on every rank)."""
        if self.group is None:
            return values
        summed = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(summed, group=self.group)
        return [float(v) for v in summed.cpu().tolist()]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (small, picklable; our own processes), in rank order."""
        if self.group is None:
            return [value]
        everyone: list[Any] = [None] * self.count
        dist.all_gather_object(everyone, value, group=self.group)
        return everyone

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_world and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_world = False

    def _device(self) -> torch.device:
        if self.mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def start_island_ranks(
    config: IslandConfig, layout: IslandLayout, device: torch.device, store: Any = None
) -> IslandRanks:
    """Start torch.distributed over this process's world when the island needs it, and build
    the island's process groups (a collective: every process of the world calls it).

    One rank per island with island.parallel=none needs no group: the torch transport then
    starts its own world of islands, as it always has.
    """
    if layout.parallel is Parallelism.none:
        return IslandRanks(build_mesh(layout, device))
    owns = not dist.is_initialized()
    if owns:
        _init_world(config, layout, device, store)
    return IslandRanks(build_mesh(layout, device), owns_world=owns)


def _init_world(
    config: IslandConfig, layout: IslandLayout, device: torch.device, store: Any
) -> None:
    settings = config.transport.torch
    timeout = datetime.timedelta(seconds=settings.timeout_s)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if store is None and layout.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # A lone process: a world of one needs no rendezvous.
        store = dist.HashStore()  # type: ignore[attr-defined]
    if store is not None:
        dist.init_process_group(
            backend,
            store=store,
            rank=layout.world_rank,
            world_size=layout.world_size,
            timeout=timeout,
        )
        return
    shares_world = config.transport.kind is TransportKind.torch
    dist.init_process_group(
        backend,
        # The torch transport's rendezvous names the whole world; an island of grpc or
        # hivemind is its own torchrun, whose MASTER_ADDR / MASTER_PORT env:// reads.
        init_method=settings.init_method if shares_world else "env://",
        rank=layout.world_rank,
        world_size=layout.world_size,
        timeout=timeout,
    )


def shard_lane(ranks: IslandRanks) -> str:
    """The transport lane of this rank's shard: rank r of every island meets in `shard-<r>`
    (an exchange group of its own); "" with one rank per island (today's one group)."""
    return f"shard-{ranks.rank}" if ranks.count > 1 else ""


def build_rank_transports(
    setup: TransportSetup,
    ranks: IslandRanks,
    build: Callable[[TransportSetup], T],
    addresses: Callable[[T], tuple[str, ...]],
) -> T:
    """This rank's transports, `build(setup)`. On an island of several ranks rank 0 builds
    first: it alone hosts a coordinator (grpc.serve) and writes where others join
    (hivemind.address_file); the other ranks then reach their groups through its
    `addresses` (hivemind's DHT)."""
    if ranks.count == 1:
        return build(setup)
    lead = build(setup) if ranks.rank == 0 else None
    everyone = ranks.gather(addresses(lead) if lead is not None else ())
    if lead is not None:
        return lead
    grpc = dataclasses.replace(setup.config.grpc, serve=False)
    hivemind = dataclasses.replace(setup.config.hivemind, address_file="")
    config = dataclasses.replace(setup.config, grpc=grpc, hivemind=hivemind)
    return build(
        dataclasses.replace(setup, config=config, bootstrap=(*setup.bootstrap, *everyone[0]))
    )


def first_addresses(built: BuiltTransports) -> tuple[str, ...]:
    """Where others reach this process's first transport (hivemind's multiaddrs; else none)."""
    return tuple(getattr(built.transports[0], "visible_maddrs", ()))
