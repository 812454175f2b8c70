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

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diloco.checkpoint.atomic import write_atomic
from diloco.codecs.base import Codec, PayloadError, all_finite
from diloco.shared_state import OuterOptimizer, SharedState
from diloco.transports.grpc.deadline import AdaptiveDeadline
from diloco.transports.grpc.guard import check_seed, check_weight
from diloco.transports.grpc.membership import INITIAL_WEIGHTS_KEY as INITIAL_WEIGHTS_KEY
from diloco.transports.grpc.membership import PARAMETERS_KEY as PARAMETERS_KEY
from diloco.transports.grpc.membership import Member, Membership, parse_count
from diloco.transports.grpc.rounds import (
    ClosedRound,
    Contribution,
    NotReady,
    OpenRound,
    RefusedPayload,
    RoundRules,
    combine,
)
from diloco.transports.grpc.state_keeper import StateKeeper

log = logging.getLogger(__name__)

MEMBERSHIP_FILE = "membership.json"
KEPT_MEANS = 2
"""Closed rounds whose mean stays held (a late or retried payload gets the last one's)."""
RELEASED = torch.empty(0, dtype=torch.uint8)


class NotAuthorized(PermissionError):
    """A call without the session of the rank it claims."""


@dataclass(frozen=True)
class RoundAnswer:
    """What an island gets back for its payload."""

    round: int
    participants: int
    params_sha256: str
    """The hash of the shared parameters after the round, or "" in the first answers of a
    round (it is computed after they go out; each island hashes its own)."""
    mean_payload: torch.Tensor | None
    """The re-encoded mean (uint8), or None when `adopt` is set."""
    adopt: SharedState | None = None
    """The group's state to adopt: the keeper's own (no copy per caller), to be read with
    `keeper.read_chunks(generation)`, which fails if a round's step changed it meanwhile."""
    generation: int = 0
    late: bool = False


@dataclass
class CoordinatorStats:
    rounds_closed: int = 0
    late_payloads: int = 0
    refused_payloads: int = 0
    dropped_payloads: int = 0
    adopted: int = 0
    participants: list[int] = field(default_factory=list)


class Coordinator:
    """Every public method is thread-safe; none raises from a background thread.

    Args:
        rules: the run's rounds, islands and deadlines.
        codec: the run's codec.
        optimizer: the outer step (the same rule every island applies).
        pinned: fingerprint entries fixed by the coordinator's own config (may be empty).
        state_dir: where the state is persisted (None: in memory only).
        clock: monotonic seconds (tests move it by hand).
    """

    def __init__(
        self,
        rules: RoundRules,
        codec: Codec,
        optimizer: OuterOptimizer,
        *,
        pinned: Mapping[str, str],
        state_dir: Path | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rules = rules
        self.codec = codec
        self.clock = clock
        self.deadline = AdaptiveDeadline(
            rules.deadline_floor_s, rules.deadline_ceiling_s, rules.deadline_slack
        )
        self.membership = Membership(rules.islands, rules.run_id, pinned, rules.deadline_ceiling_s)
        self.keeper = StateKeeper(optimizer, codec, state_dir)
        self.stats = CoordinatorStats()
        self.history: collections.deque[ClosedRound] = collections.deque(maxlen=200)
        self.started = time.time()
        self._cond = threading.Condition()
        self._open = OpenRound(0)
        self._last: ClosedRound | None = None
        self._waiting_warned = False
        self._stopped = False
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
            return self._open.round, self.keeper.state is not None, new_session

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
            self._close_if_complete()
            self._persist_membership()

    def active_islands(self) -> int:
        with self._cond:
            return self.membership.active_count()

    def everyone_left(self) -> bool:
        with self._cond:
            return self.membership.everyone_left()

    # -- shared state -----------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return self.keeper.numel

    @property
    def round(self) -> int:
        return self._open.round

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

    def seed(self, rank: int, state: SharedState) -> bool:
        """Take a joined island's state as the group's when there is none yet; False otherwise.

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
                initial_weights=fingerprint.get(INITIAL_WEIGHTS_KEY),
            )
            self._open = OpenRound(int(state.round))
            self.keeper.seed(state, self._persisted(None))
            log.info("island %d seeded the shared state at round %d", rank, state.round)
            return True

    # -- rounds -----------------------------------------------------------------------------

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        """The payload's fp32 values, or RefusedPayload (wrong size/codec, non-finite)."""
        numel = self.numel
        if numel == 0:
            raise NotReady("the coordinator holds no shared state yet: join first")
        try:
            delta = self.codec.decode(payload, numel)
        except PayloadError as error:
            raise RefusedPayload(str(error)) from None
        if not all_finite(delta):
            bad = int((~torch.isfinite(delta)).sum())
            raise RefusedPayload(f"the payload holds {bad} non-finite value(s) (NaN or inf)")
        return delta

    def note_metrics(self, rank: int, metrics: Mapping[str, float], received: int) -> None:
        """An island's latest figures and the payload bytes it sent (the status page's)."""
        with self._cond:
            member = self.membership.members.get(rank)
            if member is not None:
                member.metrics = dict(metrics)
                member.bytes_received += received

    def refuse(self, rank: int, reason: str, what: str = "payload") -> None:
        """Count and log a refused payload (or state); `reason` escapes what came from the wire."""
        with self._cond:
            self.stats.refused_payloads += 1
            self._open.refused += 1
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
            if self.keeper.state is None:
                raise NotReady("the coordinator holds no shared state yet: join first")
            self.keeper.settle()
            member = self.membership.members.get(rank)
            if member is None or member.left:
                raise NotReady(f"island {rank} has not joined this coordinator")
            member.active = True
            member.last_round = max(member.last_round, round)
            stale = self._answer_stale(rank, round, sha, delta)
            if stale is not None:
                return stale
            assert delta is not None
            self._open.add(rank, Contribution(weight, delta, self.clock()))
            self._close_if_complete()
            return self._wait_for_close(round, wait_s)

    def tick(self) -> None:
        """Close the open round if its deadline has passed (called periodically; never raises)."""
        try:
            with self._cond:
                self._close_if_due()
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

    def finished(self) -> bool:
        with self._cond:
            self.keeper.settle()
            return self.keeper.state is not None and self._open.round >= self.rules.rounds

    @property
    def last_closed(self) -> ClosedRound | None:
        return self._last

    # -- internals (called with the lock held) -----------------------------------------------

    def _answer_stale(
        self, rank: int, round: int, sha: str, delta: torch.Tensor | None
    ) -> RoundAnswer | None:
        """The answer for a payload that is not for the open round, or None if it is."""
        last = self._last
        if round == self._open.round - 1 and last is not None and sha == last.sha_before:
            if rank in last.ranks:  # a retry of a payload the round holds (the answer was lost)
                return RoundAnswer(last.round, last.participants, last.sha_after, last.mean_payload)
            # Late by less than a round: the island gets that round's mean, applies it, and is
            # in step with the group again.
            self.stats.late_payloads += 1
            last.late += 1
            self.deadline.observe_late(self.clock() - last.first_arrival)
            log.warning(
                "island %d's payload for round %d came after the round closed: dropped; "
                "it receives the round's mean",
                rank,
                round,
            )
            return RoundAnswer(
                last.round, last.participants, last.sha_after, last.mean_payload, late=True
            )
        if round != self._open.round or sha != self.keeper.sha or delta is None:
            return self._adopt_answer(rank, round, sha)
        return None

    def _adopt_answer(self, rank: int, round: int, sha: str) -> RoundAnswer:
        state = self.keeper.state
        assert state is not None
        self.stats.adopted += 1
        why = (
            f"its round {round} is not the group's {self._open.round}"
            if round != self._open.round
            else "its shared parameters differ from the group's"
        )
        log.warning("island %d is told to adopt the shared state: %s", rank, why)
        participants = self._last.participants if self._last is not None else 0
        return RoundAnswer(
            state.round,
            participants,
            self.keeper.sha,
            None,
            adopt=state,
            generation=self.keeper.generation,
        )

    def _wait_for_close(self, round: int, wait_s: float | None) -> RoundAnswer:
        limit = None if wait_s is None else self.clock() + wait_s
        while self._open.round == round and not self._stopped:
            remaining = None if limit is None else limit - self.clock()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"round {round} is still open")
            self._cond.wait(timeout=0.25 if remaining is None else min(0.25, remaining))
            self._close_if_due()
        if self._stopped and self._open.round == round:
            raise NotReady("the coordinator is shutting down")
        # Usually the last closed round; an older one if later rounds closed meanwhile.
        closed = next((c for c in reversed(self.history) if c.round == round), None)
        if closed is None or closed.mean_payload is RELEASED:
            raise NotReady(f"round {round} closed too long ago: send again")
        # The hash is not part of a fresh answer: it may still be being computed.
        return RoundAnswer(round, closed.participants, "", closed.mean_payload)

    def _close_if_complete(self) -> None:
        if not self._open.pending:
            return
        # Islands that never joined are expected until the deadline (they may be starting);
        # members that missed a round are not (they may be gone).
        missing, never_seen = self.membership.waiting_for(set(self._open.pending))
        if not missing and never_seen == 0:
            self._close()

    def _close_if_due(self) -> None:
        opened = self._open
        if not opened.pending or opened.first_arrival is None:
            return
        self._close_if_complete()
        if self._open is not opened:
            return
        if self.clock() - opened.first_arrival < self.deadline.seconds():
            return
        if len(opened.pending) < self.rules.min_islands:
            if not self._waiting_warned:
                log.warning(
                    "round %d: deadline passed with %d of transport.min_islands=%d islands; "
                    "waiting for more",
                    opened.round,
                    len(opened.pending),
                    self.rules.min_islands,
                )
                self._waiting_warned = True
            return
        self._close()

    def _close(self) -> None:
        self.keeper.settle()
        opened = self._open
        assert opened.first_arrival is not None
        mean_payload, ranks, dropped = combine(self.rules, self.codec, opened.pending)
        closed = ClosedRound(
            round=opened.round,
            ranks=ranks,
            mean_payload=mean_payload,
            sha_before=self.keeper.sha,
            first_arrival=opened.first_arrival,
            duration_s=self.clock() - opened.first_arrival,
            deadline_s=self.deadline.seconds(),
            dropped=dropped,
        )
        self.deadline.observe_round(opened.offsets)
        missing, _ = self.membership.waiting_for(set(opened.pending))
        for rank in missing:
            self.membership.members[rank].active = False
        if missing:
            log.warning(
                "round %d closed at its deadline without island(s) %s", opened.round, missing
            )
        self.stats.rounds_closed += 1
        self.stats.dropped_payloads += dropped
        self.stats.participants.append(len(ranks))
        self._last = closed
        self.history.append(closed)
        if len(self.history) > KEPT_MEANS:  # the history keeps figures, not every mean
            self.history[-KEPT_MEANS - 1].mean_payload = RELEASED
        self._open = OpenRound(opened.round + 1)
        self._waiting_warned = False
        # The islands get their answer now; the outer step, the new state's hash and its copy
        # on disk follow in the background (nothing reads the state before `settle`). A
        # coordinator killed in between restarts one round back: the islands then adopt that.
        self.keeper.step_in_background(mean_payload, self._after_step(closed))
        self._cond.notify_all()

    def _after_step(self, closed: ClosedRound) -> Callable[[str], dict[str, Any]]:
        def persist(sha_after: str) -> dict[str, Any]:
            closed.sha_after = sha_after
            return self._persisted(closed)

        return persist

    def _persisted(self, last: ClosedRound | None) -> dict[str, Any]:
        """What a restarted coordinator needs besides the state (tensors by reference)."""
        return {
            "last": None
            if last is None
            else {
                "round": last.round,
                "ranks": list(last.ranks),
                "mean_payload": last.mean_payload,
                "sha_before": last.sha_before,
                "sha_after": last.sha_after,
            },
            "stats": {**vars(self.stats), "participants": list(self.stats.participants)},
        }

    def _persist_membership(self) -> None:
        """Sessions change on join and leave: saved at once, so a restarted coordinator knows
        every island's session (else it would hold their ranks against them)."""
        state_dir = self.keeper.state_dir
        if state_dir is not None:
            text = json.dumps(self.membership.to_json(), sort_keys=True)
            write_atomic(state_dir / MEMBERSHIP_FILE, text)

    def _restore(self) -> None:
        assert self.keeper.state_dir is not None
        membership = self.keeper.state_dir / MEMBERSHIP_FILE
        if membership.is_file():
            self.membership.restore(json.loads(membership.read_text()), self.clock())
        saved = self.keeper.restore()
        if saved is None:
            return
        self._open = OpenRound(self.keeper.state.round if self.keeper.state else 0)
        last = saved.get("last")
        if last is not None:
            self._last = ClosedRound(
                round=int(last["round"]),
                ranks=tuple(int(r) for r in last["ranks"]),
                mean_payload=last["mean_payload"],
                sha_before=str(last["sha_before"]),
                sha_after=str(last["sha_after"]),
                first_arrival=self.clock(),
            )
        self.stats = CoordinatorStats(**saved.get("stats", {}))
        log.warning(
            "coordinator resumed from %s at round %d with islands %s",
            self.keeper.state_dir,
            self._open.round,
            sorted(self.membership.members),
        )
