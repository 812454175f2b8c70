"""The grpc coordinator's rules: membership, rounds and the shared state, behind one lock.

No grpc here (`service.py` is the wire side), so these rules are tested with threads alone.
Three parts, each in its own module: `Membership` (who is in the group, sessions),
`OpenRound` / `combine` (what a round holds and how it becomes one mean) and `StateKeeper`
(the shared state, the outer step, the hash, the copy on disk). This class decides when:

- A round closes when every active island has reported (and every expected island has joined
  once), or at its adaptive deadline once `min_islands` have. Islands that missed a round are
  inactive until they report again, so later rounds do not wait for an island that is gone.
- A payload for the round that just closed gets that round's mean (flagged late; its payload
  is dropped and counted); a retry of a payload the round holds gets the same answer. Anything
  older, or a payload computed from shared parameters that are not the group's, gets the
  current shared state to adopt instead.
- The state is persisted after every round; a restarted coordinator carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from diloco.codecs.base import Codec
from diloco.shared_state import OuterOptimizer, SharedState
from diloco.transports.grpc.answers import CoordinatorStats as CoordinatorStats
from diloco.transports.grpc.answers import RoundAnswer as RoundAnswer
from diloco.transports.grpc.answers import adopt_answer
from diloco.transports.grpc.closing import RoundCloser
from diloco.transports.grpc.exchanges import (
    HEADER_ONLY,
    ExchangeControl,
    ExchangeHost,
    TicketAnswer,
)
from diloco.transports.grpc.guard import check_seed, check_weight
from diloco.transports.grpc.membership import INITIAL_WEIGHTS_KEY as INITIAL_WEIGHTS_KEY
from diloco.transports.grpc.membership import PARAMETERS_KEY as PARAMETERS_KEY
from diloco.transports.grpc.membership import Member, Membership, parse_count
from diloco.transports.grpc.persistence import persisted, restore_rounds, save_membership
from diloco.transports.grpc.rounds import (
    RELEASED,
    Arrival,
    ClosedRound,
    Contribution,
    NotReady,
    OpenRound,
    RoundRules,
    classify,
    decode_contribution,
)
from diloco.transports.grpc.state_keeper import StateKeeper
from diloco.transports.grpc.status_feed import StatusFeed

log = logging.getLogger(__name__)


class NotAuthorized(PermissionError):
    """A call without the session of the rank it claims."""


class Coordinator:
    """Every public method is thread-safe; none raises from a background thread.

    Args:
        rules: the run's rounds, islands and deadlines.
        codec: the run's codec.
        optimizer: the outer step (the same rule every island applies).
        pinned: fingerprint entries fixed by the coordinator's own config (may be empty).
        state_dir: where the state is persisted (None: in memory only).
        offload_state: keep the outer optimizer's state in files in `state_dir` between outer
            steps (outer.offload_state; diloco/offload.py).
        clock: monotonic seconds (tests move it by hand).
        lane: the lane this coordinator averages ("": the main one; grpc/lanes.py).
    """

    def __init__(
        self,
        rules: RoundRules,
        codec: Codec,
        optimizer: OuterOptimizer,
        *,
        pinned: Mapping[str, str],
        state_dir: Path | None,
        offload_state: bool = False,
        clock: Callable[[], float] = time.monotonic,
        lane: str = "",
    ):
        self.rules = rules
        self.codec = codec
        self.clock = clock
        self.lane = lane
        self.membership = Membership(rules.islands, rules.run_id, pinned, rules.deadline_ceiling_s)
        self.keeper = StateKeeper(optimizer, codec, state_dir, offload_state=offload_state)
        self.stats = CoordinatorStats()
        self.status_feed = StatusFeed()  # a no-op until status_feed.attach_status
        self.started = time.time()
        self._cond = threading.Condition()
        # Held by the one PutState receiving a state (islands that start at once all offer one).
        self.seeding = threading.Lock()
        self.closer = RoundCloser(
            rules,
            codec,
            self.membership,
            self.keeper,
            self.stats,
            self._cond,
            clock,
            self._persisted,
        )
        self._stopped = False
        self.exchanges: ExchangeControl | None = None
        """The data plane's rounds, once `attach_exchanges` gave it one."""
        if state_dir is not None:
            self._restore()

    # -- membership -------------------------------------------------------------------------

    def join(
        self, rank: int, run_id: str, fingerprint: Mapping[str, str], session: str, host: str
    ) -> tuple[int, bool, str]:
        """Register an island; returns (completed rounds, whether the group has state, session).

        Raises:
            GroupMismatchError: another run, rank range or fingerprint; the rank is held.
        """
        with self._cond:
            new_session = self.membership.join(
                rank, run_id, fingerprint, session=session, host=host, now=self.clock()
            )
            self._persist_membership()
            log.info("island %d joined from host %r", rank, host[:128])
            self.status_feed.joined(rank, host)
            return self.closer.open.round, self.keeper.state is not None, new_session

    def authorize(self, rank: int, session: str) -> Member:
        """The member `rank`, seen now; NotAuthorized unless `session` is its session."""
        with self._cond:
            member = self.membership.check(rank, session)
            if member is None:
                raise NotAuthorized(f"no joined island {rank} with this session: join first")
            member.last_seen = self.clock()
            return member

    def leave(self, rank: int) -> None:
        with self._cond:
            self.membership.leave(rank)
            self.status_feed.left(rank)
            self.closer.close_if_complete()
            self._persist_membership()

    def active_islands(self) -> int:
        with self._cond:
            return self.membership.active_count()

    def everyone_left(self, but: int | None = None) -> bool:
        with self._cond:
            return self.membership.everyone_left(but)

    def has_members(self) -> bool:
        return bool(self.membership.members)  # a read of a dict: no lock needed

    # -- shared state -----------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return self.keeper.numel

    @property
    def round(self) -> int:
        return self.closer.open.round

    def expected_numel(self) -> int | None:
        """The number of shared parameters the group's fingerprint announces, if any."""
        with self._cond:
            fingerprint = self.membership.fingerprint or self.membership.pinned
            return parse_count(fingerprint.get(PARAMETERS_KEY, ""))

    def has_state(self) -> bool:
        with self._cond:
            return self.keeper.state is not None

    def download(self) -> tuple[SharedState, str, Iterator[bytes]] | None:
        """(the state's header fields, its hash, its bytes); None before the state is seeded.

        The bytes are read lazily, under the keeper's lock chunk by chunk (StateChanged if a
        round's step happens meanwhile: the caller retries).
        """
        with self._cond:
            self.keeper.settle()
            state = self.keeper.state
            if state is None:
                return None
            return state, self.keeper.sha, self.keeper.read_chunks(self.keeper.generation)

    def state_sha256(self) -> str:
        with self._cond:
            self.keeper.settle()
            return self.keeper.sha

    def seed(self, rank: int, state: SharedState, *, owned: bool = False) -> bool:
        """Take a joined island's state as the group's when there is none yet; False otherwise.
        `owned`: nothing else holds `state` (read from the wire): it is kept, not copied.

        Raises:
            RefusedPayload: its size is not the group's model's, its round is out of range, it
                holds non-finite values, or at round 0 it is not the group's initial weights.
        """
        with self._cond:
            if self.keeper.state is not None:
                return False
            fingerprint = self.membership.fingerprint or self.membership.pinned
            check_seed(
                state,
                self.rules,
                expected_numel=self.expected_numel(),
                # A lane's state is a slice: the whole model's initial weights do not check it.
                initial_weights=None if self.lane else fingerprint.get(INITIAL_WEIGHTS_KEY),
            )
            self.closer.open = OpenRound(int(state.round))
            self.keeper.seed(state, self._persisted(None), owned=owned)
            log.info("island %d seeded the shared state at round %d", rank, state.round)
            return True

    # -- rounds -----------------------------------------------------------------------------

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        """The payload's fp32 values, or RefusedPayload (wrong size/codec, non-finite)."""
        return decode_contribution(self.codec, payload, self.numel)

    def note_metrics(self, rank: int, metrics: Mapping[str, float], received: int) -> None:
        """An island's latest figures and the payload bytes it sent (the status page's)."""
        with self._cond:
            member = self.membership.members.get(rank)
            if member is not None:
                member.metrics = dict(metrics)
                member.bytes_received += received
        self.status_feed.metrics(rank, metrics, received)

    def refuse(self, rank: int, reason: str, what: str = "payload") -> None:
        """Count and log a refused payload (or state); `reason` escapes what came from the wire."""
        with self._cond:
            self.stats.refused_payloads += 1
            self.closer.open.refused += 1
            self.status_feed.refused(self.closer.open.round)
        log.warning("refused a %s from island %d: %s", what, rank, reason)

    def submit(
        self,
        rank: int,
        round: int,
        weight: float,
        sha: str,
        delta: torch.Tensor | None,
        wait_s: float | None = None,
    ) -> RoundAnswer:
        """Add an island's decoded payload to `round` and wait for that round's answer.

        `delta` may be None when the island is known to be behind (its payload is dropped).
        Raises TimeoutError when `wait_s` passes first (the island retries the same call), and
        RefusedPayload for a weight that is not finite tokens in (0, MAX_WEIGHT].
        """
        check_weight(weight)
        with self._cond:
            self._admit(rank, round, sha)
            stale = self._answer_stale(rank, round, sha, delta)
            if stale is not None:
                return stale
            assert delta is not None
            self.closer.open.add(rank, Contribution(weight, delta, self.clock()))
            self.closer.close_if_complete()
            return self._wait_for_close(round, wait_s)

    def attach_exchanges(self, host: ExchangeHost) -> None:
        """Average on `host`, a data plane, from now on: `submit_header` (grpc/exchanges.py)."""
        with self._cond:
            self.closer.history.kept_means = 1
            self.exchanges = ExchangeControl(
                self.closer,
                host,
                self.lane,
                self.refuse,
                stopped=lambda: self._stopped,
                answered=lambda rank, answer: self.status_feed.answer(rank, answer),
            )

    def submit_header(
        self, rank: int, round: int, weight: float, sha: str, wait_s: float | None = None
    ) -> RoundAnswer | TicketAnswer:
        """`submit` for a payload that travels on the data plane: its header joins `round`;
        the answer is its ticket once the round's participants are fixed, or (as `submit`'s)
        the round's mean, late, or the state to adopt. Raises as `submit`, and
        RefusedOnDataPlane when its payload was refused in the exchange."""
        check_weight(weight)
        with self._cond:
            self._admit(rank, round, sha)
            assert self.exchanges is not None, "attach_exchanges first"
            stale = lambda r, n, s: self._answer_stale(r, n, s, HEADER_ONLY)  # noqa: E731
            return self.exchanges.submit(rank, round, weight, sha, stale, wait_s)

    def tick(self) -> None:
        """Close the open round if its deadline has passed (called periodically; never raises)."""
        try:
            if self.exchanges is not None:  # exchanges abandoned by every participant
                self.exchanges.poll()
            with self._cond:
                self.closer.close_if_due()
        except Exception:  # a failure here must not stop the deadline thread
            log.exception("the coordinator failed to close round %d at its deadline", self.round)

    def flush(self) -> None:
        """Wait until the last closed round's state is hashed and saved."""
        with self._cond:
            self.keeper.settle()

    def stop(self) -> None:
        with self._cond:
            self.keeper.settle()
            self._stopped = True
            self._cond.notify_all()
        self.status_feed.stopped()

    def finished(self) -> bool:
        with self._cond:
            self.keeper.settle()
            return self.keeper.state is not None and self.closer.open.round >= self.rules.rounds

    @property
    def last_closed(self) -> ClosedRound | None:
        return self.closer.last

    # -- internals (called with the lock held) -----------------------------------------------

    def _admit(self, rank: int, round: int, sha: str) -> None:
        """A payload's island: joined, now expected in rounds; the state settled."""
        if self.keeper.state is None:
            raise NotReady("the coordinator holds no shared state yet: join first")
        self.keeper.settle()
        member = self.membership.members.get(rank)
        if member is None or member.left:
            raise NotReady(f"island {rank} has not joined this coordinator")
        member.active = True
        member.last_round = max(member.last_round, round)
        self.status_feed.payload(rank, round, sha)

    def _answer_stale(
        self, rank: int, round: int, sha: str, delta: torch.Tensor | None
    ) -> RoundAnswer | None:
        """The answer for a payload that is not for the open round, or None if it is."""
        last = self.closer.last
        kind = classify(
            last, self.closer.open.round, self.keeper.sha, rank, round, sha, delta is not None
        )
        if kind is Arrival.open:
            return None
        if kind is Arrival.adopt or last is None or last.mean_payload is RELEASED:
            return self._adopt_answer(rank, round, sha)  # (a data plane released the mean)
        if kind is Arrival.late:
            # Late by less than a round: the island gets that round's mean, applies it, and is
            # in step with the group again; its payload is dropped.
            self.stats.late_payloads += 1
            last.late += 1
            self.status_feed.late(round)
            self.closer.deadline.observe_late(self.clock() - last.first_arrival)
            log.warning(
                "island %d's payload for round %d came after the round closed: dropped", rank, round
            )
        late = kind is Arrival.late  # else a retry: the round holds it, its answer was lost
        return RoundAnswer(
            last.round, last.participants, last.sha_after, last.mean_payload, late=late
        )

    def _adopt_answer(self, rank: int, round: int, sha: str) -> RoundAnswer:
        self.stats.adopted += 1
        last, open_round = self.closer.last, self.closer.open.round
        return adopt_answer(self.keeper, last.participants if last else 0, rank, round, open_round)

    def _wait_for_close(self, round: int, wait_s: float | None) -> RoundAnswer:
        closed = self.closer.wait(round, wait_s, lambda: self._stopped)
        # The hash is not part of a fresh answer: it may still be being computed.
        return RoundAnswer(round, closed.participants, "", closed.mean_payload)

    def _persisted(self, last: ClosedRound | None) -> dict[str, Any]:
        if last is not None:  # called once its outer step is done: sha_after is known
            self.status_feed.round_closed(last)
        return persisted(last, self.stats)

    def _persist_membership(self) -> None:
        """Sessions change on join and leave: saved at once, so a restarted coordinator knows
        every island's session (else it would hold their ranks against them)."""
        if self.keeper.state_dir is not None:
            save_membership(self.keeper.state_dir, self.membership)

    def _restore(self) -> None:
        stats = restore_rounds(self.closer, self.membership, self.clock())
        if stats is not None:
            self.stats = stats
