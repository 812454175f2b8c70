"""What bounds the status server's cost to the coordinator, whatever its readers do: one
snapshot build per `max_age_s` (`SnapshotCache`), a rate of accepted connections
(`Throttle`, a token bucket), and a deadline and byte budget on each request's head
(`DeadlineReader`, against slow "slowloris" clients).
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from diloco.status.snapshot import StatusSnapshot

logger = logging.getLogger(__name__)

REQUEST_HEAD_BYTES = 8192
"""Most bytes a request may send (request line and headers; no request here has a body)."""


class RequestTooLarge(OSError):
    pass


class SnapshotCache:
    """Builds the snapshot's JSON at most once per `max_age_s`; every reader in between gets
    the same bytes. Readers that arrive during a build wait for it instead of building again."""

    def __init__(
        self,
        build: Callable[[], StatusSnapshot],
        max_age_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._build = build
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._body: bytes | None = None
        self._built_at = float("-inf")
        self.builds = 0

    def get(self) -> bytes | None:
        """The JSON bytes, or None when the last build failed (logged)."""
        with self._lock:
            if self._clock() - self._built_at < self._max_age_s:
                return self._body
            self.builds += 1
            try:
                self._body = self._build().to_json().encode()
            except Exception:
                # Whatever the snapshot function raises, the server answers 503 and lives on;
                # the failure is cached like a success, so a flood cannot retry it in a loop.
                logger.warning("status: building the snapshot failed", exc_info=True)
                self._body = None
            self._built_at = self._clock()
            return self._body


class Throttle:
    """A token bucket: `wait()` returns at most `rate_per_s` times a second on average (after
    a burst of `burst`). Used by the accepting thread only, so it needs no lock."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._rate_per_s = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._last = clock()

    def wait(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate_per_s)
        self._last = now
        if self._tokens < 1:
            self._sleep((1 - self._tokens) / self._rate_per_s)
            self._tokens, self._last = 1.0, self._clock()
        self._tokens -= 1


class DeadlineReader(io.RawIOBase):
    """A socket's read side that stops at a deadline and a byte budget, whatever the pace."""

    def __init__(self, connection: socket.socket, deadline: float, budget_bytes: int):
        self._connection = connection
        self._deadline = deadline
        self._budget_bytes = budget_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining_s = self._deadline - time.monotonic()
        if remaining_s <= 0:
            raise TimeoutError("request not complete before its deadline")
        if self._budget_bytes <= 0:
            raise RequestTooLarge(f"request head over {REQUEST_HEAD_BYTES} bytes")
        self._connection.settimeout(remaining_s)
        received = self._connection.recv_into(memoryview(buffer)[: self._budget_bytes])
        self._budget_bytes -= received
        return received
