"""The coordinator's rounds: who is in the group, what each round received, when it closes.

No grpc here: `RoundBook` is the state machine the grpc service calls into, so its rules are
tested with threads alone (tests/unit/test_grpc_rounds.py).

Rules (docs/transports.md):
- The coordinator keeps the shared state (anchor, outer momentum) and takes the outer step
  itself, with the mean it sends back (decoded from the re-encoded bytes, exactly as the
  islands decode it), so its state is always the group's.
- A round closes when every active island has reported (and every expected island has joined
  once), or at its adaptive deadline once `min_islands` have. Islands that missed a round are
  inactive until they report again, so later rounds do not wait for an island that is gone.
- A payload for the round that just closed gets that round's mean (flagged late; its payload
  is dropped and counted). Anything older, or a payload computed from shared parameters that
  are not the group's, gets the current shared state to adopt instead.
- A payload of the wrong size, codec or round, or with non-finite values, is refused before
  it reaches the mean.
- The state is persisted atomically after every round; a restarted coordinator carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diloco.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from diloco.codecs import Codec
from diloco.codecs.base import PayloadError, all_finite
from diloco.outer.nesterov import nesterov_step_
from diloco.outer.sync import params_sha256
from diloco.transports.aggregate import (
    clip_to_norm,
    coordinate_median,
    trimmed_mean,
    weighted_mean,
)
from diloco.transports.base import GroupMismatchError, SharedState
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
    lr: float
    momentum: float
    nesterov: bool
    aggregate: str = "mean"
    trim_fraction: float = 0.2
    clip_norm: float = 0.0
    deadline_floor_s: float = 30.0
    deadline_ceiling_s: float = 600.0
    deadline_slack: float = 2.0


@dataclass(frozen=True)
class RoundAnswer:
    """What an island gets back for its payload."""

    round: int
    participants: int
    params_sha256: str
    """The hash of the shared parameters after the round, or "" in the first answers of a
    round (it is computed after they go out; each island hashes its own, and the next round
    checks it)."""
    mean_payload: torch.Tensor | None
    """The re-encoded mean (uint8), or None when `adopt` is set."""
    adopt: SharedState | None = None
    late: bool = False


@dataclass
class _Closed:
    round: int
    participants: int
    mean_payload: torch.Tensor
    sha_before: str
    sha_after: str
    first_arrival: float
    ranks: tuple[int, ...] = ()
    """The islands whose payloads are in the mean."""


@dataclass
class _Pending:
    weight: float
    delta: torch.Tensor
    arrived: float


@dataclass
class _Member:
    active: bool = True
    left: bool = False


@dataclass
class CoordinatorStats:
    rounds_closed: int = 0
    late_payloads: int = 0
    refused_payloads: int = 0
    adopted: int = 0
    participants: list[int] = field(default_factory=list)


class RoundBook:
    """The coordinator's state, behind one lock; every public method is thread-safe."""

    def __init__(
        self,
        rules: RoundRules,
        codec: Codec,
        expected_settings: Mapping[str, str],
        state_dir: Path | None,
        clock: Any = time.monotonic,
    ):
        self.rules = rules
        self.codec = codec
        self.expected_settings = dict(expected_settings)
        self.state_dir = state_dir
        self.clock = clock
        self.deadline = AdaptiveDeadline(
            rules.deadline_floor_s, rules.deadline_ceiling_s, rules.deadline_slack
        )
        self.stats = CoordinatorStats()
        self._cond = threading.Condition()
        self._fingerprint: dict[str, str] | None = None
        self._members: dict[int, _Member] = {}
        self._anchor: torch.Tensor | None = None
        self._momentum: torch.Tensor | None = None
        self._sha = ""
        self.round = 0
        self._pending: dict[int, _Pending] = {}
        self._first_arrival: float | None = None
        self._offsets: list[float] = []
        self._last: _Closed | None = None
        self._waiting_warned = False
        self._stopped = False
        # Hashing and saving the state after a round run here, off the islands' critical path.
        self._finishing: threading.Thread | None = None
        self._finish_error: BaseException | None = None
        if state_dir is not None:
            self._restore(state_dir)

    # -- membership -------------------------------------------------------------------------

    def join(self, rank: int, run_id: str, fingerprint: Mapping[str, str]) -> tuple[int, bool]:
        """Register an island; returns (completed rounds, whether the group has state).

        Raises:
            GroupMismatchError: another run, another rank range, or a different fingerprint.
        """
        if run_id != self.rules.run_id:
            raise GroupMismatchError(
                f"transport.run_id differs: coordinator {self.rules.run_id!r}, island {run_id!r}"
            )
        if not 0 <= rank < self.rules.islands:
            raise GroupMismatchError(
                f"island rank {rank} is outside [0, transport.islands={self.rules.islands})"
            )
        with self._cond:
            reference = dict(self.expected_settings)
            if self._fingerprint is not None:
                reference.update(self._fingerprint)
            differing = [
                key
                for key in sorted(set(reference) | set(fingerprint))
                if key in reference and reference[key] != fingerprint.get(key)
            ]
            if differing:
                details = "; ".join(
                    f"{key}: group {reference.get(key)}, island {rank} {fingerprint.get(key)}"
                    for key in differing
                )
                raise GroupMismatchError(
                    f"island {rank} differs from the group and cannot join: {details}"
                )
            if self._fingerprint is None:
                self._fingerprint = dict(fingerprint)
            if rank in self._members and not self._members[rank].left:
                log.info("island %d joined again (restarted)", rank)
            self._members[rank] = _Member()
            return self.round, self._anchor is not None

    def leave(self, rank: int) -> None:
        with self._cond:
            member = self._members.get(rank)
            if member is None:
                return
            member.left = True
            member.active = False
            log.info("island %d left the group", rank)
            self._close_if_complete()

    def active_islands(self) -> int:
        with self._cond:
            return sum(1 for m in self._members.values() if m.active)

    # -- shared state -----------------------------------------------------------------------

    def has_state(self) -> bool:
        with self._cond:
            return self._anchor is not None

    def state(self) -> SharedState | None:
        """A copy of the current shared state (None before the first island seeded it)."""
        with self._cond:
            self._settle()
            if self._anchor is None or self._momentum is None:
                return None
            return SharedState(self.round, self._anchor.clone(), self._momentum.clone())

    def state_sha256(self) -> str:
        with self._cond:
            self._settle()
            return self._sha

    def seed(self, state: SharedState) -> bool:
        """Take an island's state as the group's when there is none yet; False otherwise."""
        with self._cond:
            if self._anchor is not None:
                return False
            self._anchor = state.anchor.detach().to(torch.float32).cpu().clone()
            self._momentum = state.momentum.detach().to(torch.float32).cpu().clone()
            self.round = int(state.round)
            self._sha = params_sha256(self._anchor)
            log.info("shared state seeded at round %d (%d parameters)", self.round, self.numel)
            self._write(self._snapshot())
            return True

    @property
    def numel(self) -> int:
        return 0 if self._anchor is None else self._anchor.numel()

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

    def refuse(self, rank: int, reason: str) -> None:
        with self._cond:
            self.stats.refused_payloads += 1
        log.warning("refused a payload from island %d: %s", rank, reason)

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
        Raises TimeoutError when `wait_s` passes first (the island retries the same call).
        """
        with self._cond:
            if self._anchor is None:
                raise NotReady("the coordinator holds no shared state yet: join first")
            self._settle()
            member = self._members.get(rank)
            if member is None:
                raise NotReady(f"island {rank} has not joined this coordinator")
            member.active, member.left = True, False
            now = self.clock()
            last = self._last
            if round == self.round - 1 and last is not None and sha == last.sha_before:
                if rank in last.ranks:
                    # A retry of a payload the round already holds (the answer was lost).
                    return RoundAnswer(
                        last.round, last.participants, last.sha_after, last.mean_payload
                    )
                # Late by less than a round: the island still gets that round's mean, applies
                # it, and is in step with the group again.
                self.stats.late_payloads += 1
                self.deadline.observe_late(now - last.first_arrival)
                log.warning(
                    "island %d's payload for round %d came after the round closed: dropped; "
                    "it receives the round's mean",
                    rank,
                    round,
                )
                return RoundAnswer(
                    last.round, last.participants, last.sha_after, last.mean_payload, late=True
                )
            if round != self.round or sha != self._sha or delta is None:
                return self._adopt_answer(rank, round, sha)
            if weight <= 0:
                raise RefusedPayload(f"the weight must be > 0 tokens, got {weight}")
            if rank not in self._pending:
                if self._first_arrival is None:
                    self._first_arrival = now
                self._offsets.append(now - self._first_arrival)
            self._pending[rank] = _Pending(weight, delta, now)
            self._close_if_complete()
            limit = None if wait_s is None else now + wait_s
            while self.round == round and not self._stopped:
                remaining = None if limit is None else limit - self.clock()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"round {round} is still open")
                self._cond.wait(timeout=0.25 if remaining is None else min(0.25, remaining))
                self._close_if_due()
            if self._stopped and self.round == round:
                raise NotReady("the coordinator is shutting down")
            assert self._last is not None and self._last.round == round
            closed = self._last
            # The hash is not part of a fresh answer: it may still be being computed.
            return RoundAnswer(round, closed.participants, "", closed.mean_payload)

    def tick(self) -> None:
        """Close the open round if its deadline has passed (called periodically)."""
        with self._cond:
            self._close_if_due()

    def flush(self) -> None:
        """Wait until the last closed round's state is hashed and saved."""
        with self._cond:
            self._settle()

    def stop(self) -> None:
        with self._cond:
            self._settle()
            self._stopped = True
            self._cond.notify_all()

    def finished(self) -> bool:
        with self._cond:
            self._settle()
            return self._anchor is not None and self.round >= self.rules.rounds

    def everyone_left(self) -> bool:
        with self._cond:
            return bool(self._members) and all(m.left for m in self._members.values())

    # -- internals (called with the lock held) -----------------------------------------------

    def _adopt_answer(self, rank: int, round: int, sha: str) -> RoundAnswer:
        assert self._anchor is not None and self._momentum is not None
        self.stats.adopted += 1
        why = (
            f"its round {round} is not the group's {self.round}"
            if round != self.round
            else "its shared parameters differ from the group's"
        )
        log.warning("island %d is told to adopt the shared state: %s", rank, why)
        state = SharedState(self.round, self._anchor.clone(), self._momentum.clone())
        participants = self._last.participants if self._last is not None else 0
        return RoundAnswer(self.round, participants, self._sha, None, adopt=state)

    def _close_if_complete(self) -> None:
        if not self._pending:
            return
        # Islands that never joined are expected until the deadline (they may be starting);
        # members that missed a round are not (they may be gone).
        never_seen = self.rules.islands - len(self._members)
        waiting_for = [
            rank for rank, m in self._members.items() if m.active and rank not in self._pending
        ]
        if not waiting_for and never_seen == 0:
            self._close()

    def _close_if_due(self) -> None:
        if not self._pending or self._first_arrival is None:
            return
        self._close_if_complete()
        if not self._pending:
            return
        elapsed = self.clock() - self._first_arrival
        if elapsed < self.deadline.seconds():
            return
        if len(self._pending) < self.rules.min_islands:
            if not self._waiting_warned:
                log.warning(
                    "round %d: deadline passed with %d of transport.min_islands=%d islands; "
                    "waiting for more",
                    self.round,
                    len(self._pending),
                    self.rules.min_islands,
                )
                self._waiting_warned = True
            return
        self._close()

    def _close(self) -> None:
        assert self._anchor is not None and self._momentum is not None
        self._settle()
        ranks = sorted(self._pending)
        entries = [self._pending[rank] for rank in ranks]
        deltas = [clip_to_norm(e.delta, self.rules.clip_norm) for e in entries]
        if self.rules.aggregate == "median":
            mean = coordinate_median(deltas)
        elif self.rules.aggregate == "trimmed_mean":
            mean = trimmed_mean(deltas, self.rules.trim_fraction)
        else:
            mean = weighted_mean(deltas, [e.weight for e in entries])
        mean_payload = self.codec.encode(mean)
        sha_before = self._sha
        assert self._first_arrival is not None
        self._last = _Closed(
            self.round,
            len(ranks),
            mean_payload,
            sha_before,
            "",  # filled in by _finish_round
            self._first_arrival,
            tuple(ranks),
        )
        self.deadline.observe_round(self._offsets)
        missing = [r for r, m in self._members.items() if m.active and r not in self._pending]
        for rank in missing:
            self._members[rank].active = False
        if missing:
            log.warning("round %d closed at its deadline without island(s) %s", self.round, missing)
        self.stats.rounds_closed += 1
        self.stats.participants.append(len(ranks))
        self._pending.clear()
        self._offsets = []
        self._first_arrival = None
        self._waiting_warned = False
        self.round += 1
        # The islands get their answer now; the outer step, the new state's hash and its copy
        # on disk follow in the background (nothing reads the state before _settle). A
        # coordinator killed in between restarts one round back: the islands then adopt that.
        self._sha = ""
        self._finishing = threading.Thread(
            target=self._finish_round, args=(mean_payload, self._snapshot()), daemon=True
        )
        self._finishing.start()
        self._cond.notify_all()

    def _finish_round(self, mean_payload: torch.Tensor, snapshot: dict[str, Any]) -> None:
        try:
            self._apply_and_save(mean_payload, snapshot)
        except BaseException as error:  # re-raised by _settle, in a caller's thread
            self._finish_error = error

    def _apply_and_save(self, mean_payload: torch.Tensor, snapshot: dict[str, Any]) -> None:
        assert self._anchor is not None and self._momentum is not None
        assert self._last is not None
        # The islands apply what they decode from these bytes; so does the coordinator, so its
        # state stays bit-identical to theirs.
        applied = self.codec.decode(mean_payload, self._anchor.numel())
        nesterov_step_(
            self._anchor,
            applied,
            self._momentum,
            lr=self.rules.lr,
            mu=self.rules.momentum,
            nesterov=self.rules.nesterov,
        )
        sha = params_sha256(self._anchor)
        self._sha = sha
        self._last.sha_after = sha
        snapshot["sha256"] = sha
        if snapshot["last"] is not None:
            snapshot["last"]["sha_after"] = sha
        self._write(snapshot)

    def _settle(self) -> None:
        """Wait for the previous round's hash and save (called with the lock held)."""
        if self._finishing is not None:
            self._finishing.join()
            self._finishing = None
        if self._finish_error is not None:
            raise RuntimeError(
                f"the coordinator could not finish round {self.round - 1}: {self._finish_error}"
            ) from self._finish_error

    def _write(self, snapshot: dict[str, Any]) -> None:
        if self.state_dir is not None:
            save_checkpoint(self.state_dir, snapshot["round"], snapshot, keep=2)

    def _snapshot(self) -> dict[str, Any]:
        """What a restarted coordinator needs (taken with the lock held); tensors by reference."""
        last = self._last
        return {
            "round": self.round,
            "anchor": self._anchor,
            "momentum": self._momentum,
            "sha256": self._sha,
            "fingerprint": None if self._fingerprint is None else dict(self._fingerprint),
            "members": sorted(rank for rank, m in self._members.items() if not m.left),
            "left": sorted(rank for rank, m in self._members.items() if m.left),
            "last": None
            if last is None
            else {
                "round": last.round,
                "participants": last.participants,
                "mean_payload": last.mean_payload,
                "sha_before": last.sha_before,
                "sha_after": last.sha_after,
                "ranks": list(last.ranks),
            },
            "stats": {**self.stats.__dict__, "participants": list(self.stats.participants)},
        }

    def _restore(self, state_dir: Path) -> None:
        rounds = list_checkpoints(state_dir)
        if not rounds:
            return
        state = load_checkpoint(state_dir, rounds[-1])
        self.round = int(state["round"])
        self._anchor = state["anchor"]
        self._momentum = state["momentum"]
        self._sha = str(state["sha256"])
        if params_sha256(self._anchor) != self._sha:
            raise RuntimeError(f"the coordinator state in {state_dir} is corrupt (hash differs)")
        self._fingerprint = state["fingerprint"]
        # Islands of the earlier run are expected back: rounds wait for them until they miss one.
        self._members = {rank: _Member() for rank in state["members"]}
        # Islands that left are known but not expected (else every round waits for its deadline).
        for rank in state.get("left", []):
            self._members[rank] = _Member(active=False, left=True)
        last = state["last"]
        if last is not None:
            self._last = _Closed(
                last["round"],
                last["participants"],
                last["mean_payload"],
                last["sha_before"],
                last["sha_after"],
                self.clock(),
                tuple(last.get("ranks", ())),
            )
        self.stats = CoordinatorStats(**state["stats"])
        log.warning(
            "coordinator resumed from %s at round %d with islands %s",
            state_dir,
            self.round,
            state["members"],
        )
