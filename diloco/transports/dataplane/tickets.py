"""Tickets: the control plane's permission for one data-plane exchange, checked by the server.

A ticket names one exchange (island, shard, fragment, round, attempt) and the exact number of
payload bytes the control plane expects for it, until an expiry time. Its MAC is
HMAC-SHA256 (RFC 2104, https://www.rfc-editor.org/rfc/rfc2104) under a key derived from the
run token, so the token itself never travels on the data plane, a ticket for another run or
with any field changed fails, and the comparison takes `hmac.compare_digest` (constant time).
A ticket is used once: the server remembers used ids (`ReplayCache`) until they expire.

Wire form (little-endian, `TICKET_BYTES` bytes):
    id 16s | island u32 | shard u32 | fragment u32 | round u64 | attempt u32
    | payload bytes u64 | expires (unix ms) u64 | mac 32s
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import secrets
import struct
import threading
import time
from dataclasses import dataclass

_FIELDS = struct.Struct("<16sIIIQIQQ")
_MAC_BYTES = 32
TICKET_BYTES = _FIELDS.size + _MAC_BYTES
TICKET_ID_BYTES = 16
# Domain separation: this key and these MACs mean nothing anywhere else the token is used.
_KEY_LABEL = b"diloco/dataplane/ticket-key/v1\x00"
_MAC_LABEL = b"diloco/dataplane/ticket/v1\x00"
_LIMITS = {"island": 2**32, "shard": 2**32, "fragment": 2**32, "round": 2**64, "attempt": 2**32}


class TicketRefused(ValueError):
    """A ticket the data plane must not honour; `reason` is a short code for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class TicketFields:
    """What a ticket allows: one exchange and its exact size."""

    island: int
    """The island's rank in the run."""
    shard: int = 0
    """The rank within the island whose shard of the flat vector this exchange carries."""
    fragment: int = 0
    """The Streaming DiLoCo fragment (0 when the model is one fragment)."""
    round: int
    attempt: int = 0
    """Which try of this exchange: an aborted exchange is retried on a new ticket."""
    payload_bytes: int
    """The exact payload size the control plane expects (never the peer's claim)."""


@dataclass(frozen=True)
class Ticket:
    ticket_id: bytes
    fields: TicketFields
    expires_unix_ms: int
    mac: bytes

    def to_bytes(self) -> bytes:
        return _pack_fields(self.ticket_id, self.fields, self.expires_unix_ms) + self.mac

    @classmethod
    def from_bytes(cls, raw: bytes) -> Ticket:
        """Parse a ticket's wire form (its MAC is not checked here: `verify_ticket`)."""
        if len(raw) != TICKET_BYTES:
            raise TicketRefused("malformed", f"a ticket has {TICKET_BYTES} bytes, got {len(raw)}")
        ticket_id, island, shard, fragment, round, attempt, size, expires = _FIELDS.unpack(
            raw[: _FIELDS.size]
        )
        fields = TicketFields(
            island=island,
            shard=shard,
            fragment=fragment,
            round=round,
            attempt=attempt,
            payload_bytes=size,
        )
        return cls(ticket_id, fields, expires, bytes(raw[_FIELDS.size :]))


def derive_ticket_key(token: str, run_id: str) -> bytes:
    """The 32-byte MAC key of `run_id`'s tickets, derived from the run token."""
    return hmac.new(token.encode(), _KEY_LABEL + run_id.encode(), hashlib.sha256).digest()


def ticket_mac(
    key: bytes, run_id: str, ticket_id: bytes, fields: TicketFields, expires_unix_ms: int
) -> bytes:
    """HMAC-SHA256 over the run id and every field of the ticket."""
    run = run_id.encode()
    message = _MAC_LABEL + struct.pack("<H", len(run)) + run
    message += _pack_fields(ticket_id, fields, expires_unix_ms)
    return hmac.new(key, message, hashlib.sha256).digest()


def issue_ticket(
    key: bytes,
    run_id: str,
    fields: TicketFields,
    *,
    expires_unix_ms: int,
    ticket_id: bytes,
) -> Ticket:
    """A signed ticket (pure: the caller picks the id and the expiry; `new_ticket` does).

    Raises:
        ValueError: a field outside its wire range, or an id not of TICKET_ID_BYTES bytes.
    """
    if len(ticket_id) != TICKET_ID_BYTES:
        raise ValueError(f"a ticket id has {TICKET_ID_BYTES} bytes, got {len(ticket_id)}")
    for name, limit in (*_LIMITS.items(), ("payload_bytes", 2**64)):
        value = getattr(fields, name)
        if not 0 <= value < limit:
            raise ValueError(f"ticket {name} must be in [0, {limit}), got {value}")
    if not 0 <= expires_unix_ms < 2**64:
        raise ValueError(f"ticket expiry must be in [0, 2**64) ms, got {expires_unix_ms}")
    mac = ticket_mac(key, run_id, ticket_id, fields, expires_unix_ms)
    return Ticket(ticket_id, fields, expires_unix_ms, mac)


def new_ticket(key: bytes, run_id: str, fields: TicketFields, ttl_s: float) -> Ticket:
    """A ticket with a fresh random id, valid for `ttl_s` seconds from now."""
    expires = int((time.time() + ttl_s) * 1000)
    return issue_ticket(
        key,
        run_id,
        fields,
        expires_unix_ms=expires,
        ticket_id=secrets.token_bytes(TICKET_ID_BYTES),
    )


def verify_ticket(key: bytes, run_id: str, ticket: Ticket, *, now_unix_s: float) -> None:
    """Refuse a ticket whose MAC does not match (forged, altered, another run) or that expired.

    Raises:
        TicketRefused: reason "forged" or "expired".
    """
    expected = ticket_mac(key, run_id, ticket.ticket_id, ticket.fields, ticket.expires_unix_ms)
    if not hmac.compare_digest(expected, ticket.mac):
        raise TicketRefused("forged", "the ticket's MAC does not match (forged or altered)")
    if now_unix_s * 1000 >= ticket.expires_unix_ms:
        late_s = now_unix_s - ticket.expires_unix_ms / 1000
        raise TicketRefused("expired", f"the ticket expired {late_s:.1f} s ago")


class ReplayCache:
    """Ids of used tickets, each kept until its expiry (after that `verify_ticket` refuses the
    ticket anyway). Bounded: when full of unexpired ids it refuses new ones instead of
    forgetting any, so a replay can never pass. Thread-safe."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"replay cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._used: set[bytes] = set()
        self._by_expiry: list[tuple[int, bytes]] = []

    def claim(self, ticket: Ticket, *, now_unix_s: float) -> None:
        """Mark `ticket` used.

        Raises:
            TicketRefused: reason "replayed" (used before) or "replay-cache-full".
        """
        with self._lock:
            now_ms = now_unix_s * 1000
            while self._by_expiry and self._by_expiry[0][0] <= now_ms:
                self._used.discard(heapq.heappop(self._by_expiry)[1])
            if ticket.ticket_id in self._used:
                raise TicketRefused("replayed", "the ticket was used before (a replay)")
            if len(self._used) >= self.capacity:
                raise TicketRefused(
                    "replay-cache-full",
                    f"{self.capacity} unexpired tickets are in use; refusing more",
                )
            self._used.add(ticket.ticket_id)
            heapq.heappush(self._by_expiry, (ticket.expires_unix_ms, ticket.ticket_id))

    def __len__(self) -> int:
        with self._lock:
            return len(self._used)


def _pack_fields(ticket_id: bytes, fields: TicketFields, expires_unix_ms: int) -> bytes:
    return _FIELDS.pack(
        ticket_id,
        fields.island,
        fields.shard,
        fields.fragment,
        fields.round,
        fields.attempt,
        fields.payload_bytes,
        expires_unix_ms,
    )
