"""When the coordinator's open round closes, and what closing it does.

A round closes when every active island has reported (and every expected island has joined
once), or at its adaptive deadline once `min_islands` have. Islands that missed a round are
inactive until they report again, so later rounds do not wait for an island that is gone.
Closing combines the contributions (`rounds.close_round`), records the round, and hands the
mean to the state keeper, whose outer step, hash and save run in the background while the
islands get their answer. With a data plane (grpc/exchanges.py), closing first only *fixes*
the round's participants (`fix`): the mean comes from their exchange, and `finish` closes the
round with it. Called with the coordinator's lock held (`cond`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from diloco.codecs.base import Codec
from diloco.transports.grpc.answers import CoordinatorStats
from diloco.transports.grpc.deadline import AdaptiveDeadline
from diloco.transports.grpc.membership import Membership
from diloco.transports.grpc.rounds import (
    ClosedRound,
    NotReady,
    OpenRound,
    RoundHistory,
    RoundRules,
    close_round,
)
from diloco.transports.grpc.state_keeper import AnswersSent, StateKeeper

log = logging.getLogger(__name__)


class RoundCloser:
    """The open round, the last closed one, and the rules that close rounds."""

    def __init__(
        self,
        rules: RoundRules,
        codec: Codec,
        membership: Membership,
        keeper: StateKeeper,
        stats: CoordinatorStats,
        cond: threading.Condition,
        clock: Callable[[], float],
        persisted: Callable[[ClosedRound | None], dict[str, Any]],
    ):
        self.rules, self.codec = rules, codec
        self.membership, self.keeper, self.stats = membership, keeper, stats
        self.cond, self.clock, self.persisted = cond, clock, persisted
        self.deadline = AdaptiveDeadline(
            rules.deadline_floor_s, rules.deadline_ceiling_s, rules.deadline_slack
        )
        self.history = RoundHistory()
        self.open = OpenRound(0)
        self.last: ClosedRound | None = None
        self.fix: Callable[[OpenRound], None] | None = None
        """With a data plane: takes the round whose participants are now fixed, instead of
        combining it here (grpc/exchanges.py); it calls `finish` with the mean."""
        self._waiting_warned = False

    def wait(self, round: int, wait_s: float | None, stopped: Callable[[], bool]) -> ClosedRound:
        """Block until `round` has closed; its record (with its mean)."""
        limit = None if wait_s is None else self.clock() + wait_s
        while self.open.round == round and not stopped():
            remaining = None if limit is None else limit - self.clock()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"round {round} is still open")
            self.cond.wait(timeout=0.25 if remaining is None else min(0.25, remaining))
            self.close_if_due()
        if stopped() and self.open.round == round:
            raise NotReady("the coordinator is shutting down")
        # Usually the last closed round; an older one if later rounds closed meanwhile.
        closed = self.history.mean_of(round)
        if closed is None:
            raise NotReady(f"round {round} closed too long ago: send again")
        return closed

    def close_if_complete(self) -> None:
        if not self.open.pending or self.open.fixed:
            return
        # Islands that never joined are expected until the deadline (they may be starting);
        # members that missed a round are not (they may be gone).
        missing, never_seen = self.membership.waiting_for(set(self.open.pending))
        if not missing and never_seen == 0:
            self.close()

    def close_if_due(self) -> None:
        opened = self.open
        if not opened.pending or opened.first_arrival is None or opened.fixed:
            return
        self.close_if_complete()
        if self.open is not opened:
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
        self.close()

    def close(self) -> None:
        self.keeper.settle()
        opened = self.open
        if self.fix is not None:
            opened.fixed = True
            self.fix(opened)
            return
        closed = close_round(
            self.rules,
            self.codec,
            opened,
            sha_before=self.keeper.sha,
            deadline=self.deadline,
            now=self.clock(),
        )
        self.finish(opened, closed)

    def finish(
        self, opened: OpenRound, closed: ClosedRound, answers_sent: AnswersSent | None = None
    ) -> None:
        """Close `opened` as `closed`: its record kept, the next round open, the outer step
        with its mean started in the background (once `answers_sent`, where the answers
        leave by another path: the data plane), the waiting islands woken."""
        missing = self.membership.mark_missing(set(opened.pending))
        if missing:
            log.warning(
                "round %d closed at its deadline without island(s) %s", opened.round, missing
            )
        self.history.record(closed, self.stats)
        self.last = closed
        self.open = OpenRound(opened.round + 1)
        self._waiting_warned = False
        # The islands get their answer now; the outer step, the new state's hash and its copy
        # on disk follow in the background (nothing reads the state before `settle`). A
        # coordinator killed in between restarts one round back: the islands then adopt that.
        self.keeper.step_in_background(closed.mean_payload, self._after_step(closed), answers_sent)
        self.cond.notify_all()

    def _after_step(self, closed: ClosedRound) -> Callable[[str], dict[str, Any]]:
        def persist(sha_after: str) -> dict[str, Any]:
            closed.sha_after = sha_after
            return self.persisted(closed)

        return persist
