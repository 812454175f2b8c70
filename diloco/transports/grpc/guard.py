"""What keeps one caller from stopping or stalling the coordinator: timeouts and call limits.

A token holder is a semi-trusted site. Everything it sends is checked before it touches state
(`check_average_header`), and no call it makes may hold the server for long:

- `StreamWatchdog`: every stream has an inactivity timeout (no chunk for `idle_s`) and a total
  deadline; a stream past either is cancelled, which frees its server thread.
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

from diloco.transports.grpc.rounds import RefusedPayload, RoundRules

log = logging.getLogger(__name__)

MAX_WEIGHT = 1e18
"""Tokens one island can claim for a round: far above any real run, far below overflow."""
MAX_METRICS = 16
MIN_BYTES_PER_S = 1e6
"""The slowest link a transfer is given time for (past that, a stream is cut as stalled)."""
_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_SHA = re.compile(r"^[0-9a-f]{0,64}$")


def check_average_header(header: Any, rules: RoundRules, islands_round: int) -> None:
    """Refuse an Average header whose numbers are not finite or not in range.

    Raises:
        RefusedPayload: naming the field, what was expected and (escaped) what came.
    """
    if not 0 <= header.rank < rules.islands:
        raise RefusedPayload(f"rank {header.rank} is outside [0, {rules.islands})")
    if not 0 <= header.round <= max(rules.rounds, islands_round):
        raise RefusedPayload(f"round {header.round} is outside [0, {rules.rounds}]")
    weight = header.weight
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise RefusedPayload(
            f"the weight must be finite tokens in (0, {MAX_WEIGHT:g}], got {weight!r}"
        )
    if header.payload_bytes < 0:
        raise RefusedPayload(f"payload_bytes must be >= 0, got {header.payload_bytes}")
    if not _SHA.match(header.params_sha256):
        raise RefusedPayload(
            f"params_sha256 must be a sha256 hex digest, got {header.params_sha256!r}"
        )
    check_metrics(header.metrics)


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """An island's figures for the status page: a few finite numbers with plain names."""
    if len(metrics) > MAX_METRICS:
        raise RefusedPayload(f"at most {MAX_METRICS} metrics, got {len(metrics)}")
    for name, value in metrics.items():
        if not _METRIC_NAME.match(name):
            raise RefusedPayload(f"metric names are [a-z0-9_], got {name!r}")
        if not math.isfinite(value):
            raise RefusedPayload(f"metric {name!r} must be finite, got {value!r}")
    return dict(metrics)


@dataclass
class _Watched:
    context: Any
    what: str
    idle_s: float
    deadline: float
    last_activity: float


class StreamWatch:
    """One stream's handle: `touch()` on every chunk that moves."""

    def __init__(self, entry: _Watched):
        self._entry = entry

    def touch(self) -> None:
        self._entry.last_activity = time.monotonic()


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
        self, context: Any, what: str, idle_s: float, total_s: float
    ) -> Iterator[StreamWatch]:
        now = time.monotonic()
        entry = _Watched(context, what, idle_s, now + total_s, now)
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
                expired = [
                    e
                    for e in self._entries.values()
                    if now - e.last_activity > e.idle_s or now > e.deadline
                ]
                for entry in expired:
                    self._entries.pop(id(entry), None)
            for entry in expired:
                idle = now - entry.last_activity > entry.idle_s
                log.warning(
                    "cancelled a %s stream from %s: %s",
                    entry.what,
                    _peer(entry.context),
                    f"idle for {entry.idle_s:.0f} s" if idle else "past its deadline",
                )
                self.cancelled += 1
                entry.context.cancel()


class CallLimits:
    """Bounds on concurrent calls: per (method, rank), and per method in total."""

    def __init__(self, per_rank: Mapping[str, int], total: Mapping[str, int]):
        self._per_rank = dict(per_rank)
        self._total = dict(total)
        self._counts: dict[tuple[str, int], int] = {}
        self._totals: dict[str, int] = {}
        self._lock = threading.Lock()
        self.refused = 0

    def try_acquire(self, method: str, rank: int) -> bool:
        """Count one more call of `method` by `rank`; False (nothing counted) over a bound."""
        key = (method, rank)
        with self._lock:
            over_rank = self._counts.get(key, 0) >= self._per_rank.get(method, 1 << 30)
            over_total = self._totals.get(method, 0) >= self._total.get(method, 1 << 30)
            if over_rank or over_total:
                self.refused += 1
                return False
            self._counts[key] = self._counts.get(key, 0) + 1
            self._totals[method] = self._totals.get(method, 0) + 1
            return True

    def release(self, method: str, rank: int) -> None:
        with self._lock:
            self._counts[(method, rank)] -= 1
            self._totals[method] -= 1


def _peer(context: Any) -> str:
    try:
        return repr(context.peer())
    except Exception:
        return "?"
