"""The transport protocol: who averages pseudo-gradients with whom.

A transport moves payloads (uint8 tensors made by a codec) and returns the weighted mean as an
fp32 tensor. It knows bytes and peers, never models. Each transport decides how it reduces;
whatever it does, the mean is summed in fp32 and is bit-identical on every island.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from diloco.codecs.base import Codec
from diloco.errors import ConfigError
from diloco.shared_state import OuterOptimizer, SharedState

if TYPE_CHECKING:
    from diloco.transports.config import TransportConfig


@dataclass(frozen=True)
class AverageResult:
    """The outcome of one round's average, as seen by one island."""

    mean: torch.Tensor
    """Weighted mean of the decoded pseudo-gradients, fp32, on the payload's device."""
    participants: int
    """Islands whose payloads are in the mean."""
    bytes_sent: int
    """Payload bytes this island put on the wire for this average."""
    bytes_received: int
    """Payload bytes this island took off the wire for this average."""
    adopt: SharedState | None = None
    """Set when the group moved on without this island (it was more than a round late, or its
    shared parameters differed from the group's): adopt this state instead of applying `mean`."""


class Transport(Protocol):
    """One island's handle on the group."""

    rank: int
    num_islands: int

    def join(self, available_rounds: Sequence[int], fingerprint: Mapping[str, str]) -> int | None:
        """Check that the islands belong together and agree on the round to resume from.

        Args:
            available_rounds: rounds this island holds a checkpoint of.
            fingerprint: what must be equal on every island (model shapes, initial weights,
                group-critical settings), by name.

        Returns:
            The newest round every island holds, or None to start from scratch.

        Raises:
            GroupMismatchError: the islands' fingerprints differ; the message says where.
        """
        ...

    def average(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None = None,
    ) -> AverageResult:
        """Weighted mean of every island's payload for `round` (weight: tokens this round).

        `params_sha256` is the hash of the shared parameters the payload was computed from;
        transports that keep the shared state check it (the others may ignore it).

        The caller hands `payload` over: a transport may write into its buffer (grpc's data
        plane reads the mean back into it, which saves a model-sized buffer), so the caller
        must not read it afterwards; the result's mean may be a view of that buffer.
        """
        ...

    def close(self) -> None:
        """Leave the group; safe to call twice."""
        ...


@runtime_checkable
class SharedStateSource(Protocol):
    """A transport that can hand a newcomer the group's current shared state (grpc, hivemind).

    The local and torch transports do not: their islands resume together from checkpoints.
    """

    def shared_state(self, local: SharedState) -> SharedState | None:
        """The group's current shared state, or None when `local` already is it.

        A group that holds no state yet (the first island of a run) takes `local` as its own.
        """
        ...


@runtime_checkable
class DecodesMeanInto(Protocol):
    """A transport that can decode the round's mean into a buffer the caller hands over (grpc).

    The caller's pseudo-gradient is spent once its payload is encoded: the mean decoded into
    it needs no fresh model-sized vector, whose pages the kernel would fault in (and zero)
    every round. Transports without this method allocate the mean; the result is the same.
    """

    def average_into(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None,
        spare_N: torch.Tensor | None,
        *,
        checked_finite: bool = False,
    ) -> AverageResult:
        """`average(payload, weight, round, params_sha256)`; the result's mean may be `spare_N`
        (fp32, one value per element; the caller hands it over: it is overwritten; None: no
        spare buffer). `checked_finite`: the caller has checked that the payload decodes to
        finite values (OuterSync does, before it encodes), so the transport need not."""
        ...


def average_checked(
    transport: Transport,
    payload: torch.Tensor,
    weight: float,
    round: int,
    params_sha256: str | None,
    spare_N: torch.Tensor | None = None,
) -> AverageResult:
    """`transport.average` of a payload its caller has checked: the encoding of a finite
    pseudo-gradient (codecs refuse to encode what would not decode to finite values). A
    transport that would check it again (`DecodesMeanInto`: grpc, whose island reads its
    payload once more before sending it) is told, and takes `spare_N` for the mean; a payload
    that is bad after all is still refused by the coordinator, naming its island."""
    if isinstance(transport, DecodesMeanInto):
        return transport.average_into(
            payload, weight, round, params_sha256, spare_N, checked_finite=True
        )
    return transport.average(payload, weight=weight, round=round, params_sha256=params_sha256)


class GroupMismatchError(ConfigError):
    """Islands that would average together run different models or group settings.

    A config mistake found when the islands meet: the CLI reports it like any config error.
    """


def check_fingerprints(fingerprints: Sequence[Mapping[str, str]]) -> None:
    """Raise GroupMismatchError naming every entry on which the islands differ."""
    keys = sorted(set().union(*fingerprints))
    differing = [key for key in keys if len({fp.get(key) for fp in fingerprints}) > 1]
    if not differing:
        return
    details = "; ".join(
        f"{key}: " + ", ".join(f"island {i} {fp.get(key)}" for i, fp in enumerate(fingerprints))
        for key in differing
    )
    raise GroupMismatchError(f"islands differ and cannot average together: {details}")


def newest_common_round(rounds_per_island: Sequence[Sequence[int]]) -> int | None:
    """The newest round every island holds a checkpoint of, or None."""
    common = set.intersection(*(set(rounds) for rounds in rounds_per_island))
    return max(common) if common else None


def ring_allreduce_bytes(payload_bytes: int, num_islands: int) -> int:
    """Bytes one island sends (and receives) in a ring all-reduce of a payload.

    Reduce-scatter then all-gather: 2 (N - 1) / N of the payload each way. This is also what
    DDP moves per step for its fp32 gradients, which makes the two directly comparable.
    """
    return 2 * (num_islands - 1) * payload_bytes // num_islands


@dataclass(frozen=True, kw_only=True)
class TransportSetup:
    """What a transport is built from; the composition root fills it."""

    config: TransportConfig
    codec: Codec
    numel: int
    """Elements of the shared parameter vector (of this rank's shard, for sharded islands)."""
    ranks: list[int]
    """The islands this process hosts (all of them for local, one otherwise)."""
    rounds: int
    """outer.rounds: when the group is done."""
    optimizer: OuterOptimizer
    """The outer step, for transports that keep or serve the shared state."""
    group_settings: Mapping[str, str]
    """The settings part of the group fingerprint, which a coordinator checks on join."""
    run_dir: Path
    """run.dir: the coordinator keeps its state in run_dir/coordinator/."""
    device: torch.device
    offload_state: bool = False
    """outer.offload_state: a coordinator keeps the outer optimizer's state in files between
    outer steps (in run_dir/coordinator/outer-state/; diloco/offload.py)."""
    store: Any = None
    """A torch.distributed store made by the caller (tests own theirs)."""
    group: Any = None
    """On islands of several ranks that share one torch.distributed world (torch transport):
    the process group of this rank's shard index across islands. None: the world."""
    lane: str = ""
    """Which independent exchange this transport carries when an island has several (one per
    Streaming DiLoCo fragment): transports that name their groups keep lanes apart."""
    bootstrap: tuple[str, ...] = ()
    """Addresses of this island's first lane, which its other lanes join through (hivemind)."""
    announce: Callable[[str], None] = lambda message: None
    """How to tell the user something they must act on (where others can join this island)."""


@dataclass(frozen=True)
class BuiltTransports:
    transports: list[Transport]
    """One per hosted island, in `TransportSetup.ranks` order."""
    abort: Callable[[], None]
    """Releases hosted islands waiting in a collective when one of them failed."""
