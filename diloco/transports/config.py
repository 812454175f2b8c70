"""The `transport` section of the config, and the builder of each transport kind.

`TRANSPORTS` owns the names of `transport.kind`: one builder per kind, which imports its
transport only when called (the config loads without torch; hivemind is an optional extra).
Adding a transport: its module, one `TransportKind` member and one `TRANSPORTS` entry here,
and one kind in tests/conformance/test_transport.py.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from diloco.errors import ConfigError, require
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.hivemind.config import HivemindTransportConfig

if TYPE_CHECKING:
    from diloco.transports.base import BuiltTransports, TransportSetup


class TransportKind(enum.Enum):
    local = "local"
    torch = "torch"
    grpc = "grpc"
    hivemind = "hivemind"


class Aggregate(enum.Enum):
    mean = "mean"
    median = "median"
    trimmed_mean = "trimmed_mean"


class TorchBackend(enum.Enum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


@dataclass(kw_only=True)
class TorchTransportConfig:
    init_method: str = "env://"
    """torch.distributed rendezvous: env:// (torchrun's MASTER_ADDR/PORT), tcp://host:port or
    file:///shared/path."""
    backend: TorchBackend = TorchBackend.auto
    """auto (nccl on cuda, gloo on cpu), gloo or nccl."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for the slowest island before the run fails."""

    def __post_init__(self) -> None:
        require(
            self.init_method.startswith(("env://", "tcp://", "file://")),
            "transport.torch.init_method",
            "env://, tcp://host:port or file:///path",
            self.init_method,
        )
        require(self.timeout_s > 0, "transport.torch.timeout_s", "> 0", self.timeout_s)


@dataclass(kw_only=True)
class TransportConfig:
    kind: TransportKind = TransportKind.local
    """local (all islands in this process, run in turn), torch (one process per island,
    torch.distributed), grpc (a coordinator averages; TLS and a token), hivemind (peers find
    each other through a DHT and average by butterfly all-reduce, no server)."""
    islands: int = 1
    """Number of islands in the group (k in the paper; the world size for torch)."""
    rank: int = -1
    """This island's index in [0, islands) for multi-process kinds; -1: read torchrun's RANK."""
    run_id: str = "diloco"
    """Name of the run: islands with another run_id are refused (grpc) or never meet."""
    min_islands: int = 1
    """A round closes at its deadline only once this many islands have reported (grpc); the
    smallest group that averages a round (hivemind)."""
    aggregate: Aggregate = Aggregate.mean
    """How the coordinator combines payloads (grpc): mean (weighted by tokens), median or
    trimmed_mean (per coordinate, unweighted: robust to a few semi-trusted sites)."""
    trim_fraction: float = 0.2
    """trimmed_mean drops this fraction of the islands at each end, per coordinate."""
    clip_norm: float = 0.0
    """Scale down any island's pseudo-gradient whose L2 norm exceeds this (0: off; grpc)."""
    torch: TorchTransportConfig = field(default_factory=TorchTransportConfig)
    """Settings of the torch transport (read only when transport.kind is torch)."""
    grpc: GrpcTransportConfig = field(default_factory=GrpcTransportConfig)
    """Settings of the grpc transport (read only when transport.kind is grpc)."""
    hivemind: HivemindTransportConfig = field(default_factory=HivemindTransportConfig)
    """Settings of the hivemind transport (read only when transport.kind is hivemind)."""

    def __post_init__(self) -> None:
        require(self.islands >= 1, "transport.islands", ">= 1", self.islands)
        require(self.rank >= -1, "transport.rank", ">= -1", self.rank)
        if self.rank >= self.islands:
            raise ConfigError(
                f"transport.rank must be in [0, transport.islands={self.islands}), got {self.rank}"
            )
        require(bool(self.run_id), "transport.run_id", "a non-empty name", self.run_id)
        require(
            1 <= self.min_islands <= self.islands,
            "transport.min_islands",
            f"in [1, transport.islands={self.islands}]",
            self.min_islands,
        )
        require(
            0 <= self.trim_fraction < 0.5,
            "transport.trim_fraction",
            "in [0, 0.5)",
            self.trim_fraction,
        )
        require(self.clip_norm >= 0, "transport.clip_norm", ">= 0", self.clip_norm)

    def ignored_options(self) -> dict[str, str]:
        """The keys set to non-defaults that this transport kind never reads, each with what
        would read it."""
        default = TransportConfig()
        unread = {
            name: "read only by transport.kind="
            + "|".join(kind.value for kind in TransportKind if kind in kinds)
            for name, kinds in _READ_BY.items()
            if self.kind not in kinds
        }
        if hosts_every_island(self.kind):
            unread["rank"] = f"transport.kind={self.kind.value} runs every island in one process"
        if self.aggregate is not Aggregate.trimmed_mean:  # (the kind's reason comes first)
            unread.setdefault("trim_fraction", "read only with transport.aggregate=trimmed_mean")
        return {
            f"transport.{name}": reason
            for name, reason in unread.items()
            if getattr(self, name) != getattr(default, name)
        }


# Which kinds read each option (the others warn that it has no effect).
_ALL = frozenset(TransportKind)
_READ_BY: dict[str, frozenset[TransportKind]] = {
    "rank": _ALL,  # (kinds that host every island are removed in ignored_options)
    "aggregate": frozenset({TransportKind.grpc}),
    "trim_fraction": frozenset({TransportKind.grpc}),
    "clip_norm": frozenset({TransportKind.grpc}),
    "torch": frozenset({TransportKind.torch}),
    "grpc": frozenset({TransportKind.grpc}),
    "hivemind": frozenset({TransportKind.hivemind}),
}


def _local(setup: TransportSetup) -> BuiltTransports:
    from diloco.transports.base import BuiltTransports
    from diloco.transports.local import LocalGroup

    group = LocalGroup(setup.config.islands, setup.codec, setup.numel)
    return BuiltTransports([group.transport(rank) for rank in setup.ranks], group.abort)


def _torch(setup: TransportSetup) -> BuiltTransports:
    from diloco.transports.base import BuiltTransports
    from diloco.transports.torch_distributed import TorchDistributedTransport

    settings = setup.config.torch
    backend = settings.backend.value
    if settings.backend is TorchBackend.auto:
        backend = "nccl" if setup.device.type == "cuda" else "gloo"
    transport = TorchDistributedTransport(
        setup.codec,
        setup.numel,
        rank=setup.ranks[0],
        num_islands=setup.config.islands,
        init_method=settings.init_method,
        backend=backend,
        timeout_s=settings.timeout_s,
        store=setup.store,
        group=setup.group,
    )
    return BuiltTransports([transport], lambda: None)


def _grpc(setup: TransportSetup) -> BuiltTransports:
    from diloco.transports.base import BuiltTransports
    from diloco.transports.grpc.hosting import build_grpc_transport

    return BuiltTransports([build_grpc_transport(setup)], lambda: None)


def _hivemind(setup: TransportSetup) -> BuiltTransports:
    from diloco.transports.base import BuiltTransports

    try:
        from diloco.transports.hivemind.build import build_hivemind_transport
    except ImportError as error:
        raise ConfigError(
            f"transport.kind hivemind needs the hivemind package ({error.name} is missing): "
            'pip install -e ".[hivemind]"'
        ) from None
    return BuiltTransports([build_hivemind_transport(setup)], lambda: None)


@dataclass(frozen=True)
class TransportEntry:
    build: Callable[[TransportSetup], BuiltTransports]
    hosts_every_island: bool = False
    """One process runs every island of the group (else one island per process, whose rank
    comes from transport.rank or torchrun, and whose outputs go to run.dir/island-<rank>/)."""


TRANSPORTS: dict[TransportKind, TransportEntry] = {
    TransportKind.local: TransportEntry(_local, hosts_every_island=True),
    TransportKind.torch: TransportEntry(_torch),
    TransportKind.grpc: TransportEntry(_grpc),
    TransportKind.hivemind: TransportEntry(_hivemind),
}


def hosts_every_island(kind: TransportKind) -> bool:
    return TRANSPORTS[kind].hosts_every_island


def build_transports(setup: TransportSetup) -> BuiltTransports:
    """The hosted islands' transports of `setup.config.kind`."""
    return TRANSPORTS[setup.config.kind].build(setup)
