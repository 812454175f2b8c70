"""The data plane's wire format and its bounded socket reads and writes.

One TCP connection (TLS unless the caller says insecure) carries one exchange:

    island -> server   hello: magic b"DLDP" | version u16 | ticket length u16 | ticket
                       the payload bytes (exactly the ticket's count) | TRAILER
    server -> island   answer header: magic b"DLDA" | status u8 | 3 pad | length u64
                       then `length` bytes: the answer (status OK) or a UTF-8 reason

All integers little-endian. The trailer after the payload makes a payload longer than its
ticket a deterministic refusal (its first extra bytes land where the trailer should be),
rather than a race on whether the extra bytes have arrived yet.

Every read and write is bounded twice: `inactivity_s` for any single wait on the socket, and
an absolute `deadline` (time.monotonic()) for the whole exchange.
"""

from __future__ import annotations

import enum
import socket
import ssl
import struct
import sys
import time
from typing import Protocol

from diloco.transports.dataplane.tickets import TICKET_BYTES

HELLO_MAGIC = b"DLDP"
ANSWER_MAGIC = b"DLDA"
VERSION = 1
_HELLO_PREFIX = struct.Struct("<4sHH")
HELLO_PREFIX_BYTES = _HELLO_PREFIX.size
HELLO_BYTES = HELLO_PREFIX_BYTES + TICKET_BYTES
MAX_HELLO_BYTES = 512
"""The most a hello may announce; more is refused before a byte of it is read."""
TRAILER = b"DLDP-END"
_ANSWER_HEADER = struct.Struct("<4sB3xQ")
ANSWER_HEADER_BYTES = _ANSWER_HEADER.size
MAX_REASON_BYTES = 256
# One write at a time, so each gets its own inactivity timeout: a socket timeout bounds a whole
# `sendall`, however large (Python >= 3.5).
SEND_SLICE_BYTES = 4 << 20
RECV_SLICE_BYTES = 4 << 20
# Plain sockets are read with MSG_WAITALL under SO_RCVTIMEO where the kernel has both (Linux;
# the struct timeval of its 64-bit ABI); elsewhere, and for TLS, with Python's timeouts.
_WAIT_ALL = sys.platform.startswith("linux") and hasattr(socket, "MSG_WAITALL")
_TIMEVAL = struct.Struct("@ll")


class Status(enum.IntEnum):
    OK = 0
    REFUSED = 1
    """The server will not take this exchange (ticket, limits, payload); the reason follows."""
    ABORTED = 2
    """The exchange's attempt was abandoned (another participant failed): retry on a new
    ticket from the control plane."""


class ChunkReader(Protocol):
    """A payload stream read in pieces: what the server hands its sink, and what the
    coordinator's accumulator reads (tests use in-memory ones)."""

    def read_into(self, view: memoryview) -> None:
        """Fill `view` with the next len(view) bytes of the payload.

        Raises:
            StreamError: the stream stalled, broke, ran past its deadline, or would go past
                its payload's size.
        """
        ...


class DataPlaneError(RuntimeError):
    """An exchange that did not complete; `reason` is a short code for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class StreamError(DataPlaneError):
    """A socket that stalled ("stalled"), closed or broke ("broken"), ran past the exchange's
    deadline ("deadline") or sent more than it should ("overrun")."""


class AnswerBroken(StreamError):
    """The answer's stream failed after its OK header: the buffer it was being read into holds
    part of it (an island that reads the mean into its payload's buffer cannot resend)."""


class ExchangeRefused(DataPlaneError):
    """The server refused the exchange and said why (reason "refused")."""


class ExchangeAborted(DataPlaneError):
    """The exchange's attempt was aborted: ask the control plane for a new ticket."""


class HelloRefused(DataPlaneError):
    """A hello that is not a data-plane v1 hello."""


def pack_hello(ticket: bytes) -> bytes:
    return _HELLO_PREFIX.pack(HELLO_MAGIC, VERSION, len(ticket)) + ticket


def parse_hello_prefix(raw: bytes) -> int:
    """The ticket length a hello prefix announces.

    Raises:
        HelloRefused: another magic or version, or a ticket length this version does not use.
    """
    magic, version, ticket_bytes = _HELLO_PREFIX.unpack(raw)
    if magic != HELLO_MAGIC:
        raise HelloRefused("bad-magic", f"not a data-plane hello: magic {magic!r}")
    if version != VERSION:
        raise HelloRefused("bad-version", f"hello version {version!r}, this server speaks 1")
    if ticket_bytes != TICKET_BYTES or HELLO_PREFIX_BYTES + ticket_bytes > MAX_HELLO_BYTES:
        raise HelloRefused(
            "size", f"hello announces a {ticket_bytes!r}-byte ticket, expected {TICKET_BYTES}"
        )
    return int(ticket_bytes)


def pack_answer_header(status: Status, length: int) -> bytes:
    return _ANSWER_HEADER.pack(ANSWER_MAGIC, int(status), length)


def parse_answer_header(raw: bytes) -> tuple[Status, int]:
    """(status, length) of an answer header.

    Raises:
        StreamError: reason "broken" for anything but a data-plane answer header.
    """
    magic, status, length = _ANSWER_HEADER.unpack(raw)
    if magic != ANSWER_MAGIC or status not in {s.value for s in Status}:
        raise StreamError("broken", f"not a data-plane answer: magic {magic!r}, status {status!r}")
    return Status(status), int(length)


def refusal_frame(status: Status, reason: str) -> bytes:
    """A non-OK answer: header and a short UTF-8 reason."""
    text = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
    return pack_answer_header(status, len(text)) + text


def tune_socket(sock: socket.socket, buffer_bytes: int) -> None:
    """No Nagle delay (the hello and answer header are small); large kernel buffers, set before
    connect/listen so the TCP window scale is negotiated for them. 0 keeps autotuning."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


def _set_wait(sock: socket.socket, deadline: float, inactivity_s: float, what: str) -> None:
    """Bound the next socket call by the inactivity timeout and the deadline. settimeout costs
    a system call (it sets O_NONBLOCK), so only when the value changes: while the deadline is
    further than `inactivity_s`, it does not."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise StreamError("deadline", f"{what}: the exchange's deadline passed")
    wait_s = min(inactivity_s, left)
    if sock.gettimeout() != wait_s:
        sock.settimeout(wait_s)


def recv_exact_into(
    sock: socket.socket, view: memoryview, *, deadline: float, inactivity_s: float, what: str
) -> None:
    """Fill `view` from `sock` (no intermediate bytes objects).

    Raises:
        StreamError: stalled, broken (closed early, reset, TLS error) or past the deadline.
    """
    if _WAIT_ALL and not isinstance(sock, ssl.SSLSocket):
        _recv_waiting_for_all(sock, view, deadline=deadline, inactivity_s=inactivity_s, what=what)
        return
    got, size = 0, len(view)
    while got < size:
        _set_wait(sock, deadline, inactivity_s, what)
        try:
            count = sock.recv_into(view[got:], size - got)
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise StreamError("deadline", f"{what}: the exchange's deadline passed") from None
            raise StreamError(
                "stalled", f"{what}: nothing for {inactivity_s:g} s after {got} of {size} bytes"
            ) from None
        except (OSError, ssl.SSLError) as error:
            raise StreamError("broken", f"{what}: {error!r} after {got} of {size} bytes") from None
        if count == 0:
            raise StreamError("broken", f"{what}: closed after {got} of {size} bytes")
        got += count


def _recv_waiting_for_all(
    sock: socket.socket, view: memoryview, *, deadline: float, inactivity_s: float, what: str
) -> None:
    """`recv_exact_into` of a plain TCP socket: one system call per slice of up to
    RECV_SLICE_BYTES (MSG_WAITALL), the waits bounded by the kernel (SO_RCVTIMEO). A timeout
    in Python mode would poll before every read, and a read returns what one loopback burst
    holds (64 KiB): 2 x 100 MB answers took 0.088-0.113 s that way against 0.065-0.078 s
    (raw sockets 0.058-0.068 s; a socket micro-bench on the 2-core box). The same bounds,
    but coarser: a read that ends with part of its slice (the kernel's timeout returns what
    it has) is progress, one that gets nothing for `inactivity_s` or runs into the deadline
    fails; so a stream that stops partway through a slice fails within 2 x `inactivity_s`."""
    got, size = 0, len(view)
    if sock.gettimeout() is not None:
        sock.settimeout(None)  # blocking: the kernel's timeout below bounds each read
    timeout_set = -1.0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StreamError("deadline", f"{what}: the exchange's deadline passed")
        wait_s = min(inactivity_s, left)
        if wait_s != timeout_set:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(wait_s))
            timeout_set = wait_s
        want = min(size - got, RECV_SLICE_BYTES)
        try:
            count = sock.recv_into(view[got : got + want], want, socket.MSG_WAITALL)
        except BlockingIOError:  # SO_RCVTIMEO passed with nothing read
            if time.monotonic() >= deadline:
                raise StreamError("deadline", f"{what}: the exchange's deadline passed") from None
            raise StreamError(
                "stalled", f"{what}: nothing for {inactivity_s:g} s after {got} of {size} bytes"
            ) from None
        except OSError as error:
            raise StreamError("broken", f"{what}: {error!r} after {got} of {size} bytes") from None
        if count == 0:
            raise StreamError("broken", f"{what}: closed after {got} of {size} bytes")
        got += count


def _timeval(seconds: float) -> bytes:
    """A struct timeval of `seconds` (> 0); never all zero, which means "wait forever"."""
    whole, fraction = divmod(seconds, 1.0)
    return _TIMEVAL.pack(int(whole), max(int(fraction * 1e6), 0 if whole else 1))


def send_all(
    sock: socket.socket, view: memoryview, *, deadline: float, inactivity_s: float, what: str
) -> None:
    """Write all of `view`, slice by slice, each slice bounded by the inactivity timeout.

    Raises:
        StreamError: stalled, broken or past the deadline.
    """
    for start in range(0, len(view), SEND_SLICE_BYTES):
        _set_wait(sock, deadline, inactivity_s, what)
        try:
            sock.sendall(view[start : start + SEND_SLICE_BYTES])
        except TimeoutError:
            raise StreamError(
                "stalled", f"{what}: the peer took nothing for {inactivity_s:g} s"
            ) from None
        except (OSError, ssl.SSLError) as error:
            raise StreamError("broken", f"{what}: {error!r} after {start} bytes") from None
