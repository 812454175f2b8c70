"""One round on the coordinator: the contributions it holds, and how they become one mean.

No grpc and no lock here: the coordinator (`coordinator.py`) calls in with its lock held.
`combine` applies `transport.aggregate` (a pure function from `diloco.aggregate.AGGREGATES`)
after `transport.clip_norm`, and encodes the result once: every island decodes the same bytes.
A contribution that makes the round fail to combine (its mean would not encode) is dropped,
counted, and the round is combined again without it: one caller cannot poison a round. When
none combines, the round closes with nobody in it (a zero mean, which always encodes), so a
close never raises and the next round starts clean.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from diloco.aggregate import AGGREGATES, AggregateOptions, clip_to_norm
from diloco.codecs.base import Codec, PayloadError, all_finite
from diloco.transports.grpc.answers import CoordinatorStats
from diloco.transports.grpc.deadline import AdaptiveDeadline

log = logging.getLogger(__name__)


class RefusedPayload(ValueError):
    """A payload that must not reach the mean; the message says why."""


class NotReady(RuntimeError):
    """The coordinator cannot take this call yet (no shared state, island not joined)."""


@dataclass(frozen=True)
class RoundRules:
    """What the coordinator needs to know of the run (from the config)."""

    run_id: str
    rounds: int
    islands: int
    min_islands: int
    aggregate: str = "mean"
    trim_fraction: float = 0.2
    clip_norm: float = 0.0
    deadline_floor_s: float = 30.0
    deadline_ceiling_s: float = 600.0
    deadline_slack: float = 2.0


@dataclass
class Contribution:
    weight: float
    delta: torch.Tensor
    """The decoded payload, fp32."""
    arrived: float


@dataclass
class ClosedRound:
    """A round that has closed: what its islands got back."""

    round: int
    ranks: tuple[int, ...]
    """The islands whose payloads are in the mean."""
    mean_payload: torch.Tensor
    sha_before: str
    sha_after: str = ""
    """The hash of the shared parameters after the round; "" until the outer step is done."""
    first_arrival: float = 0.0
    closed_at: float = field(default_factory=time.time)
    """Unix time of the close."""
    duration_s: float = 0.0
    """From the round's first payload to its close."""
    deadline_s: float = 0.0
    late: int = 0
    dropped: int = 0
    """Contributions dropped while combining (they would have poisoned the mean)."""

    @property
    def participants(self) -> int:
        return len(self.ranks)


@dataclass
class OpenRound:
    """The round being collected: contributions by rank, and when they came."""

    round: int
    pending: dict[int, Contribution] = field(default_factory=dict)
    first_arrival: float | None = None
    offsets: list[float] = field(default_factory=list)
    """Arrival times after the first payload (the adaptive deadline learns from them)."""
    refused: int = 0
    fixed: bool = False
    """Its participants are fixed (data plane): no payload joins it any more."""

    def add(self, rank: int, contribution: Contribution) -> None:
        if self.first_arrival is None:
            self.first_arrival = contribution.arrived
        if rank not in self.pending:
            self.offsets.append(contribution.arrived - self.first_arrival)
        self.pending[rank] = contribution


def combine(
    rules: RoundRules, codec: Codec, contributions: dict[int, Contribution]
) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """(the encoded mean, the ranks in it, how many were dropped) of a round's contributions.

    Never raises for what the contributions hold: with none left, the mean is zero.
    """
    ranks = sorted(contributions)
    dropped = 0
    while ranks:
        try:
            return _combine_once(rules, codec, contributions, ranks), tuple(ranks), dropped
        except Exception as error:  # a value that does not encode: find whose it is
            culprit = _largest(contributions, ranks)
            log.warning(
                "the round's mean could not be encoded (%r): dropping island %d's contribution",
                str(error)[:200],
                culprit,
            )
            ranks.remove(culprit)
            dropped += 1
    log.error("no contribution of the round could be combined: it closes with a zero mean")
    numel = next(iter(contributions.values())).delta.numel() if contributions else 0
    return codec.encode(torch.zeros(numel)), (), dropped


def _combine_once(
    rules: RoundRules, codec: Codec, contributions: dict[int, Contribution], ranks: Sequence[int]
) -> torch.Tensor:
    entries = [contributions[rank] for rank in ranks]
    deltas = [clip_to_norm(entry.delta, rules.clip_norm) for entry in entries]
    aggregate = AGGREGATES[rules.aggregate]
    mean = aggregate(
        deltas,
        [entry.weight for entry in entries],
        AggregateOptions(trim_fraction=rules.trim_fraction),
    )
    return codec.encode(mean)


def _largest(contributions: dict[int, Contribution], ranks: Sequence[int]) -> int:
    """The rank whose weighted contribution is largest in magnitude: the likeliest culprit."""

    def magnitude(rank: int) -> float:
        entry = contributions[rank]
        size = float(entry.delta.abs().max()) * entry.weight if entry.delta.numel() else 0.0
        return size if size == size else math.inf  # NaN: certainly the culprit

    return max(ranks, key=magnitude)


class Arrival(enum.Enum):
    """What a payload is, relative to the rounds the coordinator holds."""

    open = "open"
    """For the open round, from the group's shared parameters: it joins the round."""
    retry = "retry"
    """For the round that just closed, which already holds it: the answer was lost."""
    late = "late"
    """For the round that just closed, from its parameters, too late: it gets that mean."""
    adopt = "adopt"
    """Anything else (older, or from other parameters, or no payload): adopt the state."""


def classify(
    last: ClosedRound | None,
    open_round: int,
    state_sha: str,
    rank: int,
    round: int,
    sha: str,
    has_payload: bool,
) -> Arrival:
    if round == open_round - 1 and last is not None and sha == last.sha_before:
        return Arrival.retry if rank in last.ranks else Arrival.late
    if round != open_round or sha != state_sha or not has_payload:
        return Arrival.adopt
    return Arrival.open


def decode_contribution(codec: Codec, payload: torch.Tensor, numel: int) -> torch.Tensor:
    """The payload's fp32 values, or RefusedPayload (wrong size or codec, non-finite)."""
    if numel == 0:
        raise NotReady("the coordinator holds no shared state yet: join first")
    try:
        delta = codec.decode(payload, numel)
    except PayloadError as error:
        raise RefusedPayload(str(error)) from None
    if not all_finite(delta):
        bad = int((~torch.isfinite(delta)).sum())
        raise RefusedPayload(f"the payload holds {bad} non-finite value(s) (NaN or inf)")
    return delta


def close_round(
    rules: RoundRules,
    codec: Codec,
    opened: OpenRound,
    *,
    sha_before: str,
    deadline: AdaptiveDeadline,
    now: float,
) -> ClosedRound:
    """The open round closed: its contributions combined, its arrivals taught to `deadline`."""
    assert opened.first_arrival is not None
    mean_payload, ranks, dropped = combine(rules, codec, opened.pending)
    closed = ClosedRound(
        round=opened.round,
        ranks=ranks,
        mean_payload=mean_payload,
        sha_before=sha_before,
        first_arrival=opened.first_arrival,
        duration_s=now - opened.first_arrival,
        deadline_s=deadline.seconds(),
        dropped=dropped,
    )
    deadline.observe_round(opened.offsets)
    return closed


KEPT_MEANS = 2
"""Closed rounds whose mean stays held (a late or retried payload gets the last one's)."""
RELEASED = torch.empty(0, dtype=torch.uint8)


class RoundHistory:
    """The closed rounds' figures (the status page's), the means of the last `kept_means`."""

    def __init__(self, size: int = 200, kept_means: int = KEPT_MEANS):
        self.rounds: collections.deque[ClosedRound] = collections.deque(maxlen=size)
        self.kept_means = kept_means

    def __iter__(self) -> Iterator[ClosedRound]:
        return iter(self.rounds)

    def __len__(self) -> int:
        return len(self.rounds)

    def record(self, closed: ClosedRound, stats: CoordinatorStats) -> None:
        stats.rounds_closed += 1
        stats.dropped_payloads += closed.dropped
        stats.participants.append(closed.participants)
        self.rounds.append(closed)
        if len(self.rounds) > self.kept_means:  # figures are kept, not every mean
            self.rounds[-self.kept_means - 1].mean_payload = RELEASED

    def mean_of(self, round: int) -> ClosedRound | None:
        """The closed `round` while its mean is held, else None."""
        closed = next((c for c in reversed(self.rounds) if c.round == round), None)
        return None if closed is None or closed.mean_payload is RELEASED else closed
