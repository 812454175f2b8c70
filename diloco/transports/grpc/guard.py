"""What keeps one caller from stopping or stalling the coordinator: timeouts and call limits.

A token holder is a semi-trusted site. Every number it sends is checked to be finite and in
range before it touches state (`check_average_header`, `check_weight`, `check_seed`), and no
call it makes may hold the server for long:

- `StreamWatchdog`: every stream has an inactivity timeout (no byte moved for `idle_s`: empty
  chunks do not count), a rate floor (past its first `idle_s`, a stream that carries bytes
  must keep up MIN_BYTES_PER_S on average: a trickle of single bytes is cut as soon as an idle
  one would be) and a total deadline (`transfer_s`); a stream past any of them is cancelled,
  which frees its server thread.
- `CallLimits`: concurrent calls per rank and method, and in total, are bounded; a call over a
  bound is refused at once (RESOURCE_EXHAUSTED) instead of queueing behind a flood.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from diloco.codecs.base import all_finite
from diloco.shared_state import SharedState, params_sha256, state_numel_ok
from diloco.transports.grpc.rounds import RefusedPayload, RoundRules

log = logging.getLogger(__name__)

MAX_WEIGHT = 1e18
"""Tokens one island can claim for a round: far above any real run, far below overflow."""
MAX_METRICS = 16
MIN_BYTES_PER_S = 1e6
"""The slowest link a transfer is given time for (past that, a stream is cut as stalled)."""
# fullmatch everywhere: `$` also matches before a trailing newline.
_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_SHA = re.compile(r"(?:[0-9a-f]{64})?")


def transfer_s(nbytes: int, idle_s: float) -> float:
    """The total deadline of a stream that moves `nbytes`: `idle_s`, plus their time at the
    slowest link given time for (MIN_BYTES_PER_S)."""
    return idle_s + max(0, nbytes) / MIN_BYTES_PER_S


def check_weight(weight: float) -> None:
    """Refuse a weight that is not finite tokens in (0, MAX_WEIGHT] (`nan <= 0` is False: a
    test of `weight <= 0` alone lets NaN and inf in).

    Raises:
        RefusedPayload: naming the weight.
    """
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise RefusedPayload(
            f"the weight must be finite tokens in (0, {MAX_WEIGHT:g}], got {weight!r}"
        )


def check_average_header(header: Any, rules: RoundRules, islands_round: int) -> None:
    """Refuse an Average header whose numbers are not finite or not in range.

    Raises:
        RefusedPayload: naming the field, what was expected and (escaped) what came.
    """
    if not 0 <= header.rank < rules.islands:
        raise RefusedPayload(f"rank {header.rank} is outside [0, {rules.islands})")
    last_round = max(rules.rounds, islands_round)
    if not 0 <= header.round <= last_round:
        raise RefusedPayload(f"round {header.round} is outside [0, {last_round}]")
    check_weight(header.weight)
    if header.payload_bytes < 0:
        raise RefusedPayload(f"payload_bytes must be >= 0, got {header.payload_bytes}")
    if not _SHA.fullmatch(header.params_sha256):
        raise RefusedPayload(
            f"params_sha256 must be a sha256 hex digest, got {header.params_sha256[:80]!r}"
        )
    check_metrics(header.metrics)


def check_seed(
    state: SharedState,
    rules: RoundRules,
    *,
    expected_numel: int | None,
    initial_weights: str | None,
) -> None:
    """Refuse a state an island offers to seed the group with, unless it fits the group.

    Its anchor has the group's number of parameters (when the fingerprint says it), its round
    is in [0, rules.rounds], its outer state is per element or scalar, every value is finite,
    and a state at round 0 is the group's initial weights (when the fingerprint has their hash).

    Raises:
        RefusedPayload: naming what does not fit.
    """
    numel = state.anchor.numel()
    if expected_numel is not None and numel != expected_numel:
        raise RefusedPayload(
            f"the state has {numel} parameters, the group's model {expected_numel}"
        )
    if not 0 <= state.round <= rules.rounds:
        raise RefusedPayload(f"the state's round {state.round} is outside [0, {rules.rounds}]")
    if not state_numel_ok(state.outer_state, numel):
        raise RefusedPayload("the outer state's tensors do not match the anchor's size")
    if not all(all_finite(t) for _, t in state.tensors()):
        raise RefusedPayload("the state holds non-finite values")
    at_start = state.round == 0 and bool(initial_weights)
    if at_start and params_sha256(state.anchor)[: len(initial_weights or "")] != initial_weights:
        raise RefusedPayload("the state at round 0 is not the group's initial weights")


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """An island's figures for the status page: a few finite numbers with plain names."""
    if len(metrics) > MAX_METRICS:
        raise RefusedPayload(f"at most {MAX_METRICS} metrics, got {len(metrics)}")
    for name, value in metrics.items():
        if not _METRIC_NAME.fullmatch(name):
            raise RefusedPayload(f"metric names are [a-z0-9_], got {name[:40]!r}")
        if not math.isfinite(value):
            raise RefusedPayload(f"metric {name!r} must be finite, got {value!r}")
    return dict(metrics)


class StreamCut(Exception):
    """The watchdog cut this stream (idle, or past its deadline): not the caller's payload's
    fault, so not a refusal; the call ends CANCELLED."""


@dataclass
class _Watched:
    context: Any
    what: str
    idle_s: float
    deadline: float
    last_activity: float
    started: float
    min_bytes_per_s: float
    bytes_moved: int = 0
    cut: bool = False

    def why_cut(self, now: float) -> str | None:
        """Why this stream must be cut now, or None."""
        if now - self.last_activity > self.idle_s:
            return f"idle for {self.idle_s:g} s"
        if now > self.deadline:
            return "past its deadline"
        owed = self.min_bytes_per_s * (now - self.started - self.idle_s)
        if self.bytes_moved < owed:
            return f"slower than {self.min_bytes_per_s:g} bytes/s"
        return None


class StreamWatch:
    """One stream's handle: `touch(nbytes)` at every chunk that moves bytes."""

    def __init__(self, entry: _Watched):
        self._entry = entry

    def touch(self, nbytes: int = 0) -> None:
        self._entry.last_activity = time.monotonic()
        self._entry.bytes_moved += nbytes

    @property
    def cut(self) -> bool:
        """Whether the watchdog cancelled the stream (its reads then end early)."""
        return self._entry.cut


class StreamWatchdog:
    """One thread that cancels streams that went idle or ran past their deadline."""

    def __init__(self, period_s: float = 0.25):
        self._entries: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._period_s = period_s
        self.cancelled = 0
        self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(
        self,
        context: Any,
        what: str,
        idle_s: float,
        total_s: float,
        min_bytes_per_s: float = 0.0,
    ) -> Iterator[StreamWatch]:
        """Watch `context`'s stream while in the block; `min_bytes_per_s` (0: none) is the
        average rate it must keep up past its first `idle_s`."""
        now = time.monotonic()
        entry = _Watched(context, what, idle_s, now + total_s, now, now, min_bytes_per_s)
        with self._lock:
            self._entries[id(entry)] = entry
        try:
            yield StreamWatch(entry)
        finally:
            with self._lock:
                self._entries.pop(id(entry), None)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            now = time.monotonic()
            with self._lock:
                expired = [(e, e.why_cut(now)) for e in self._entries.values()]
                expired = [(e, why) for e, why in expired if why is not None]
                for entry, _ in expired:
                    self._entries.pop(id(entry), None)
                    entry.cut = True
            for entry, why in expired:
                log.warning(
                    "cancelled a %s stream from %s: %s", entry.what, _peer(entry.context), why
                )
                self.cancelled += 1
                entry.context.cancel()


class CallLimits:
    """Bounds on concurrent calls: per (method, rank), and per method in total. A method
    named `Average@<lane>` is counted apart from `Average`, under `Average`'s bounds."""

    def __init__(self, per_rank: Mapping[str, int], total: Mapping[str, int]):
        self._per_rank = dict(per_rank)
        self._total = dict(total)
        self._counts: dict[tuple[str, int], int] = {}
        self._totals: dict[str, int] = {}
        self._lock = threading.Lock()
        self.refused = 0
        self.peak: dict[tuple[str, int], int] = {}
        """The most calls of (method, rank) held at once so far."""

    def try_acquire(self, method: str, rank: int) -> bool:
        """Count one more call of `method` by `rank`; False (nothing counted) over a bound."""
        key = (method, rank)
        with self._lock:
            bounds = method.partition("@")[0]
            over_rank = self._counts.get(key, 0) >= self._per_rank.get(bounds, 1 << 30)
            over_total = self._totals.get(method, 0) >= self._total.get(bounds, 1 << 30)
            if over_rank or over_total:
                self.refused += 1
                return False
            self._counts[key] = self._counts.get(key, 0) + 1
            self._totals[method] = self._totals.get(method, 0) + 1
            self.peak[key] = max(self.peak.get(key, 0), self._counts[key])
            return True

    def in_flight(self, method: str, rank: int) -> int:
        with self._lock:
            return self._counts.get((method, rank), 0)

    def release(self, method: str, rank: int) -> None:
        with self._lock:
            self._counts[(method, rank)] -= 1
            self._totals[method] -= 1


def _peer(context: Any) -> str:
    try:
        return repr(context.peer())
    except Exception:
        return "?"
