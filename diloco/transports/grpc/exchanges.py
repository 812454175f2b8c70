"""The data plane's control on the coordinator: who exchanges a round's payloads, on which
tickets, and what a failed exchange does. Rules only: no sockets here (the data plane that runs
the exchanges is an `ExchangeHost`: grpc/dataplane_host.py).

With a data plane (diloco/transports/dataplane/), an island sends only its payload's header on
grpc. The round's closing rules are today's (closing.py): once every active island has reported,
or at the adaptive deadline once min_islands have, the round's participants and their weights
are *fixed*, and an exchange group (round, attempt) is opened on the data plane with one ticket
per participant. Each waiting island gets its ticket in answer to its header and streams its
payload; the host computes the weighted mean in lockstep, in rank order, bit for bit
`weighted_mean` of the decoded payloads (dataplane/accumulate.py), and answers every
participant with the one encoded mean; the round then closes with it (`RoundCloser.finish`).

When an exchange fails, the participants to blame are dropped and a new attempt starts, on new
tickets, without them (the others send again):
- a payload that was refused (malformed, non-finite, longer than its ticket) is refused as on
  the grpc path: counted, logged, and the island is answered INVALID_ARGUMENT when it asks
  again;
- a participant that stalled, broke or never connected is dropped like an island that missed
  the round: when it asks again it gets the round's mean, late (today's rule);
- a mean that would not encode (its culprit cannot be told from chunks): the participant of
  the largest weight is dropped. Each attempt drops at least one participant; with none left
  the round closes with a zero mean, as `rounds.combine` does.
A header that comes after the participants were fixed waits for the round, and gets its mean
late. The previous round's mean is released when a round is fixed (a late or retried payload of
it then adopts the state): the coordinator holds one mean at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from diloco.codecs.base import Codec
from diloco.transports.grpc.answers import RoundAnswer
from diloco.transports.grpc.closing import RoundCloser
from diloco.transports.grpc.rounds import (
    RELEASED,
    ClosedRound,
    Contribution,
    NotReady,
    OpenRound,
    RefusedPayload,
)
from diloco.transports.grpc.state_keeper import AnswersSent

log = logging.getLogger(__name__)

REFUSALS = frozenset({"refused", "too-many-bytes"})
"""Failure reasons that are the payload's fault (the others are the connection's)."""
HEADER_ONLY = torch.empty(0)
"""A contribution's payload while it travels on the data plane."""
_POLL_S = 0.25


class RefusedOnDataPlane(RefusedPayload):
    """The island's payload was refused in its round's exchange (counted there already)."""


@dataclass(frozen=True)
class GroupSpec:
    """One exchange: a round's attempt in a lane, its participants and the sizes."""

    lane: str
    round: int
    attempt: int
    weights: Mapping[int, float]
    """Island rank -> tokens, in rank order."""
    numel: int
    payload_bytes: int


@dataclass(frozen=True)
class GroupEnd:
    """How an exchange ended: the encoded mean, or who failed and why."""

    mean_payload: torch.Tensor | None
    failed: tuple[int, ...] = ()
    reason: str = ""
    message: str = ""
    answers_sent: AnswersSent | None = None
    """With a mean: waits for every participant to be done with its answer (the outer step
    waits)."""


@dataclass(frozen=True)
class TicketAnswer:
    """An island's answer while its round exchanges: where and with what to send its payload."""

    round: int
    participants: int
    ticket: bytes
    port: int


class ExchangeHost(Protocol):
    """The data plane as the control sees it."""

    port: int

    def open_group(
        self, spec: GroupSpec, codec: Codec, on_end: Callable[[GroupSpec, GroupEnd], None]
    ) -> dict[int, bytes]:
        """Register an exchange; its tickets by rank. `on_end` is called once, when it ends."""
        ...

    def unused(self, ticket: bytes) -> bool:
        """Whether no connection has presented `ticket` yet."""
        ...

    def poll(self) -> None:
        """Report exchanges that ended without a connection to report them."""
        ...


@dataclass
class Attempt:
    spec: GroupSpec
    tickets: dict[int, bytes]
    asked: set[int] = field(default_factory=set)
    """Ranks that were handed their ticket."""


class ExchangeControl:
    """The data plane's rounds of one lane's coordinator; every method but `ended` is called
    with the coordinator's lock held (`closer.cond`).

    Args:
        closer: the coordinator's rounds (its lock, open round, state keeper, counters).
        host: the data plane.
        lane: the lane's name (in tickets' groups and logs).
        refuse: counts and logs a refused payload (`Coordinator.refuse`).
        stopped: whether the coordinator is shutting down.
        answered: told of each participant's answer when its exchange closes the round.
    """

    def __init__(
        self,
        closer: RoundCloser,
        host: ExchangeHost,
        lane: str,
        refuse: Callable[[int, str], None],
        stopped: Callable[[], bool],
        answered: Callable[[int, RoundAnswer], None] = lambda rank, answer: None,
    ):
        self.closer, self.host, self.lane = closer, host, lane
        self._refuse, self._stopped, self._answered = refuse, stopped, answered
        self.attempt: Attempt | None = None
        self.refused: dict[int, tuple[int, str]] = {}
        """Rank -> (round, why) of payloads refused in an exchange."""
        self._dropped = 0
        closer.fix = self.fix

    def submit(
        self,
        rank: int,
        round: int,
        weight: float,
        sha: str,
        stale: Callable[[int, int, str], RoundAnswer | None],
        wait_s: float | None,
    ) -> RoundAnswer | TicketAnswer:
        """An island's header: its ticket once its round is fixed, or (as `submit` answers
        a payload) the late mean or the state to adopt (`stale`).

        Raises:
            RefusedOnDataPlane: its payload of `round` was refused in the exchange.
            TimeoutError: `wait_s` passed first (the island asks again).
            NotReady: the coordinator is shutting down.
        """
        clock = self.closer.clock
        limit = None if wait_s is None else clock() + wait_s
        while True:
            refused = self.refused.get(rank)
            if refused is not None and refused[0] == round:
                raise RefusedOnDataPlane(refused[1])
            answer = self._answer(rank, round, weight, sha, stale)
            if answer is not None:
                return answer
            remaining = None if limit is None else limit - clock()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"round {round} is still exchanging")
            if self._stopped():
                raise NotReady("the coordinator is shutting down")
            self.closer.cond.wait(_POLL_S if remaining is None else min(_POLL_S, remaining))
            self.closer.close_if_due()

    def fix(self, opened: OpenRound) -> None:
        """The round's participants are fixed: open its first exchange."""
        last = self.closer.last
        if last is not None:  # one mean held at a time (module docstring)
            last.mean_payload = RELEASED
        # Every participant of the last exchange got its answer (it sent a header since): the
        # host forgets that exchange now, and with it the last reference to its mean, before
        # this round's mean is allocated (else the coordinator held two means at once).
        self.host.poll()
        self._dropped = 0
        weights = {rank: c.weight for rank, c in sorted(opened.pending.items())}
        self._open(opened.round, 0, weights)

    def ended(self, spec: GroupSpec, end: GroupEnd) -> None:
        """The host's report (any thread): close the round, or try again without the failed."""
        with self.closer.cond:
            attempt = self.attempt
            if attempt is None or attempt.spec is not spec:
                return  # an attempt given up already
            self.attempt = None
            if end.mean_payload is not None:
                self._close(end.mean_payload, tuple(spec.weights), end.answers_sent)
                answer = RoundAnswer(spec.round, len(spec.weights), "", end.mean_payload)
                for rank in spec.weights:
                    self._answered(rank, answer)
                return
            failed = [rank for rank in end.failed if rank in spec.weights]
            if not failed:  # no one to blame (the mean did not encode): drop the heaviest
                failed = [max(spec.weights, key=lambda rank: spec.weights[rank])]
            for rank in failed:
                self._blame(rank, spec.round, end)
            remaining = {r: w for r, w in spec.weights.items() if r not in failed}
            self._open(spec.round, spec.attempt + 1, remaining)

    def poll(self) -> None:
        self.host.poll()

    # -- internals (the lock held) -----------------------------------------------------------

    def _answer(
        self,
        rank: int,
        round: int,
        weight: float,
        sha: str,
        stale: Callable[[int, int, str], RoundAnswer | None],
    ) -> RoundAnswer | TicketAnswer | None:
        opened = self.closer.open
        if round == opened.round and opened.fixed:
            attempt = self.attempt
            if attempt is None or rank not in attempt.spec.weights:
                return None  # late for this round, or between attempts: wait
            ticket = attempt.tickets[rank]
            if rank in attempt.asked and not self.host.unused(ticket):
                return None  # its ticket is in use: wait for this attempt's end
            attempt.asked.add(rank)
            return TicketAnswer(round, len(attempt.spec.weights), ticket, self.host.port)
        answer = stale(rank, round, sha)
        if answer is not None:
            return answer
        if rank not in opened.pending:  # a header asked again keeps its first arrival
            opened.add(rank, Contribution(weight, HEADER_ONLY, self.closer.clock()))
        self.closer.close_if_complete()
        return self._answer(rank, round, weight, sha, stale) if opened.fixed else None

    def _open(self, round: int, number: int, weights: dict[int, float]) -> None:
        if not weights:
            log.error("round %d: no participant is left in its exchange: a zero mean", round)
            self._close(None, ())
            return
        keeper, codec = self.closer.keeper, self.closer.codec
        spec = GroupSpec(
            self.lane, round, number, weights, keeper.numel, codec.payload_bytes(keeper.numel)
        )
        self.attempt = Attempt(spec, self.host.open_group(spec, codec, self.ended))
        self.closer.cond.notify_all()

    def _blame(self, rank: int, round: int, end: GroupEnd) -> None:
        if end.reason in REFUSALS:
            self.refused[rank] = (round, end.message)
            self._refuse(rank, end.message)
            return
        self._dropped += 1
        log.warning(
            "island %d is dropped from round %d's exchange (%s): %s",
            rank,
            round,
            end.reason,
            end.message[:300],
        )

    def _close(
        self,
        mean_payload: torch.Tensor | None,
        ranks: tuple[int, ...],
        answers_sent: AnswersSent | None = None,
    ) -> None:
        closer = self.closer
        opened = closer.open
        if mean_payload is None:
            mean_payload = closer.codec.encode(torch.zeros(closer.keeper.numel))
        first = opened.first_arrival if opened.first_arrival is not None else closer.clock()
        closed = ClosedRound(
            round=opened.round,
            ranks=ranks,
            mean_payload=mean_payload,
            sha_before=closer.keeper.sha,
            first_arrival=first,
            duration_s=closer.clock() - first,
            deadline_s=closer.deadline.seconds(),
            dropped=self._dropped,
        )
        closer.deadline.observe_round(opened.offsets)
        closer.finish(opened, closed, answers_sent)
