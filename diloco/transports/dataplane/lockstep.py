"""One exchange group as the server's sink: the participants' payloads averaged in lockstep.

The control plane fixes a group (one round, fragment, shard and attempt) once the round's
headers are in: its participants and their weights. It issues one ticket per participant and
registers each with the data-plane server and this sink. Each participant's connection calls
`on_payload`; the last one to arrive runs the accumulator over every participant's stream in
rank order (diloco/transports/dataplane/accumulate.py), and every connection then answers
with the same encoded mean and tells the sink once the island is done with it (`answered`:
the island closed the stream after decoding it, see server.py; the coordinator's outer step
waits for that: `answers_sent`). If any participant fails, or one never connects
before the deadline, every connection answers ABORTED and `outcome()` says who failed: the
control plane then issues a new attempt without that island (the others resend).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from diloco.transports.dataplane.accumulate import (
    Contribution,
    LockstepAccumulator,
    ParticipantFailed,
)
from diloco.transports.dataplane.framing import ChunkReader, ExchangeAborted, ExchangeRefused
from diloco.transports.dataplane.tickets import Ticket

log = logging.getLogger(__name__)

# How often a waiting connection rechecks the deadline.
_POLL_S = 0.25


@dataclass(frozen=True)
class ExchangeOutcome:
    """How a group's exchange ended: the encoded mean, or the participant that stopped it."""

    mean_payload: torch.Tensor | None
    failure: ParticipantFailed | None
    aborted: str = ""
    """Why the exchange was abandoned without a participant to blame ("" otherwise)."""


class LockstepExchange:
    """An `ExchangeSink` for one group; thread-safe."""

    def __init__(
        self,
        accumulator: LockstepAccumulator,
        weights: Mapping[int, float],
        *,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        """
        Args:
            accumulator: for the group's codec and size.
            weights: island rank -> tokens this round, for every participant.
            deadline: time.monotonic() by which every participant must have connected.
        """
        if not weights:
            raise ValueError("an exchange needs at least one participant")
        self.accumulator = accumulator
        self.weights = dict(weights)
        self.deadline = deadline
        self.clock = clock
        self._cond = threading.Condition()
        self._readers: dict[int, ChunkReader] = {}
        self._answered: set[int] = set()
        self._running = False
        self._outcome: ExchangeOutcome | None = None

    def on_payload(self, ticket: Ticket, reader: ChunkReader) -> torch.Tensor:
        """Register this participant's stream; the last one runs the accumulation.

        Returns:
            The encoded mean (the answer every participant gets).

        Raises:
            ExchangeRefused: not a participant of this group, or already connected.
            ExchangeAborted: the group's attempt failed (any participant) or was abandoned.
        """
        rank = ticket.fields.island
        with self._cond:
            if self._outcome is None and rank not in self.weights:
                raise ExchangeRefused("not-a-participant", f"island {rank} is not in this group")
            if self._outcome is None and rank in self._readers:
                raise ExchangeRefused("duplicate", f"island {rank} is already connected")
            if self._outcome is None:
                self._readers[rank] = reader
                self._running = len(self._readers) == len(self.weights)
                last = self._running
            else:
                last = False
        if last:
            self._accumulate()
        return self._wait_answer()

    def answered(self, ticket: Ticket) -> None:
        """The connection of `ticket` is done: its answer was sent and the island closed the
        stream (or did not within the server's bound), or it could not be sent."""
        with self._cond:
            self._answered.add(ticket.fields.island)
            self._cond.notify_all()

    def answers_sent(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every participant to be done with its answer (see
        `answered`); whether they all were (False too for an exchange that failed: no mean was
        sent)."""
        limit = self.clock() + timeout_s
        with self._cond:
            while not self._answered >= self.weights.keys():
                left = limit - self.clock()
                if left <= 0 or (self._outcome is not None and self._outcome.mean_payload is None):
                    return False
                self._cond.wait(left)
            return True

    def abort(self, reason: str) -> None:
        """Abandon the exchange (e.g. the coordinator stops); no effect once it ended."""
        with self._cond:
            if self._outcome is None and not self._running:
                self._outcome = ExchangeOutcome(None, None, reason)
                self._cond.notify_all()

    def outcome(self, timeout_s: float | None = None) -> ExchangeOutcome | None:
        """The exchange's outcome, waiting up to `timeout_s` (None: until the deadline passes
        and the group is found incomplete, or the accumulation ends)."""
        limit = None if timeout_s is None else self.clock() + timeout_s
        with self._cond:
            while self._outcome is None:
                self._expire_if_due()
                if self._outcome is not None:
                    break
                if limit is not None and self.clock() >= limit:
                    return None
                self._cond.wait(_POLL_S)
            return self._outcome

    def _wait_answer(self) -> torch.Tensor:
        outcome = self.outcome()
        assert outcome is not None
        if outcome.mean_payload is not None:
            return outcome.mean_payload
        why = str(outcome.failure) if outcome.failure is not None else outcome.aborted
        raise ExchangeAborted("aborted", f"the exchange was aborted: {why}")

    def _expire_if_due(self) -> None:
        """Called with the lock held: give up on participants that never connected."""
        if self._running or self.clock() < self.deadline:
            return
        missing = sorted(set(self.weights) - set(self._readers))
        failure = ParticipantFailed(
            missing[0], "missing", f"island(s) {missing} never connected before the deadline"
        )
        log.warning("data plane: exchange abandoned: %s", failure)
        self._outcome = ExchangeOutcome(None, failure)
        self._cond.notify_all()

    def _accumulate(self) -> None:
        contributions = [
            Contribution(rank, self.weights[rank], self._readers[rank])
            for rank in sorted(self.weights)
        ]
        try:
            outcome = ExchangeOutcome(self.accumulator.encoded_mean(contributions), None)
        except ParticipantFailed as failure:
            log.warning("data plane: exchange aborted: %s (%s)", failure, failure.reason)
            outcome = ExchangeOutcome(None, failure)
        except ValueError as error:  # a mean the codec refuses to encode
            log.error("data plane: exchange aborted: %s", error)
            outcome = ExchangeOutcome(None, None, str(error))
        with self._cond:
            self._outcome = outcome
            self._cond.notify_all()
