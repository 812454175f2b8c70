"""The data-plane server: one TCP (TLS) connection per exchange, admitted by a ticket.

The coordinator's control plane (grpc) registers each ticket it issues with `expect`, with the
sink that will take the payload and the exchange's deadline; the server knows nothing of
rounds. Per connection, in its own thread: TLS handshake and hello within
`hello_timeout_s`; the ticket's MAC, expiry, registration and first use; then the sink reads
exactly the registered byte count (and the trailer) through a bounded reader, and the answer
goes back on the same connection. Wire format: diloco/transports/dataplane/framing.py.

Bounds: total and unauthenticated connections are capped at accept (a flood is closed before
it costs a thread), exchanges per island after the hello; every read or write waits at most
`inactivity_timeout_s`, and nothing outlives the exchange's deadline. Every refusal is counted
by reason (`refusals()`) and logged on one line, with `!r` of anything the peer sent.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from diloco.errors import ConfigError
from diloco.transports.dataplane.config import KEY, DataPlaneConfig
from diloco.transports.dataplane.framing import (
    HELLO_PREFIX_BYTES,
    TRAILER,
    ChunkReader,
    DataPlaneError,
    ExchangeAborted,
    Status,
    StreamError,
    pack_answer_header,
    parse_hello_prefix,
    recv_exact_into,
    refusal_frame,
    send_all,
    tune_socket,
)
from diloco.transports.dataplane.tickets import ReplayCache, Ticket, TicketRefused, verify_ticket

log = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.2
_DRAIN_BYTES = 1 << 20
_LINGER_S = 1.0
_DONE_WAIT_S = 5.0
"""The longest an answered connection waits for its island to close it (an island closes
once it has decoded the answer: see `_exchange`); no longer than the coordinator's outer step
waits for the answers (grpc/state_keeper.py, ANSWERS_FIRST_S)."""


class ExchangeSink(Protocol):
    """Where the server hands an admitted exchange (the coordinator's side)."""

    def on_payload(self, ticket: Ticket, reader: ChunkReader) -> torch.Tensor:
        """Read the payload from `reader` (exactly ticket.fields.payload_bytes, in pieces of
        the sink's choosing) and return the answer: a contiguous uint8 CPU tensor.

        Raises:
            ExchangeAborted: the answer is "retry on a new ticket".
            DataPlaneError: any other refusal (its reason is counted and sent back).
        """
        ...

    def answered(self, ticket: Ticket) -> None:
        """The connection of `ticket` is done with: its answer was sent, or could not be
        (called once for every `on_payload`, whatever it returned or raised)."""
        ...


@dataclass(frozen=True)
class _Expected:
    ticket: Ticket
    sink: ExchangeSink
    deadline: float


class _Refused(Exception):
    def __init__(self, reason: str, message: str, tell_peer: bool):
        super().__init__(message)
        self.reason, self.tell_peer = reason, tell_peer


class PayloadReader:
    """The sink's view of one connection: exactly `payload_bytes`, then the trailer checked."""

    def __init__(
        self, conn: socket.socket, payload_bytes: int, deadline: float, inactivity_s: float
    ):
        self._conn, self._deadline, self._inactivity_s = conn, deadline, inactivity_s
        self.payload_bytes = payload_bytes
        self.remaining = payload_bytes
        self._trailer_read = False

    def read_into(self, view: memoryview) -> None:
        if len(view) > self.remaining:
            raise StreamError(
                "overrun", f"asked for {len(view)} bytes; {self.remaining} left of the payload"
            )
        self._recv(view, "payload")
        self.remaining -= len(view)
        if self.remaining == 0:
            self._read_trailer()

    def finish(self) -> None:
        """Read (and drop) what the sink left unread, then check the trailer."""
        scratch = memoryview(bytearray(min(_DRAIN_BYTES, max(self.remaining, 1))))
        while self.remaining > 0:
            self.read_into(scratch[: min(len(scratch), self.remaining)])
        if not self._trailer_read:
            self._read_trailer()

    def _read_trailer(self) -> None:
        got = bytearray(len(TRAILER))
        self._recv(memoryview(got), "trailer")
        self._trailer_read = True
        if bytes(got) != TRAILER:
            raise StreamError(
                "too-many-bytes",
                f"the payload is longer than the ticket's {self.payload_bytes} bytes (read "
                f"{bytes(got)!r} where the trailer belongs)",
            )

    def _recv(self, view: memoryview, what: str) -> None:
        recv_exact_into(
            self._conn, view, deadline=self._deadline, inactivity_s=self._inactivity_s, what=what
        )


class DataPlaneServer:
    """Serves exchanges on `listen` until `stop`; every public method is thread-safe."""

    def __init__(
        self,
        settings: DataPlaneConfig,
        *,
        key: bytes,
        run_id: str,
        tls: ssl.SSLContext | None,
        insecure: bool = False,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        wall_clock: Callable[[], float] = time.time,
    ):
        """
        Args:
            key: the run's ticket key (`derive_ticket_key`).
            tls: a server context (`tls.server_context`); None only with `insecure`.
            listen: (host, port) to bind; port 0 picks a free one (see `address`).
        """
        if tls is None and not insecure:
            raise ConfigError(
                f"{KEY}: the data plane needs TLS (transport.grpc.tls_cert / tls_key), or "
                "transport.grpc.insecure=true for a loopback experiment"
            )
        self.settings, self._key, self._run_id, self._tls = settings, key, run_id, tls
        self._wall_clock = wall_clock
        self._replays = ReplayCache(settings.replay_cache_size)
        self._lock = threading.Lock()
        self._expected: dict[bytes, _Expected] = {}
        self._open = self._pending = 0
        self._per_island: Counter[int] = Counter()
        self._refusals: Counter[str] = Counter()
        self.exchanges_completed = 0
        self.exchanges_aborted = 0
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_INET6 if ":" in listen[0] else socket.AF_INET)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune_socket(self._listener, settings.socket_buffer_bytes)
        try:
            self._listener.bind(listen)
        except OSError:
            self._listener.close()
            raise
        self._listener.listen(min(socket.SOMAXCONN, 4 * settings.max_connections))
        self._listener.settimeout(_ACCEPT_POLL_S)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="dataplane")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._acceptor.start()

    def stop(self) -> None:
        """Stop accepting; exchanges in progress end by their own deadlines."""
        self._stopping.set()
        if self._acceptor.is_alive():
            self._acceptor.join()
        self._listener.close()

    def expect(self, ticket: Ticket, sink: ExchangeSink, *, deadline: float) -> None:
        """Admit one exchange on `ticket` (issued by the control plane), read by `sink`, to
        end by `deadline` (time.monotonic())."""
        with self._lock:
            self._expected[ticket.ticket_id] = _Expected(ticket, sink, deadline)

    def withdraw(self, ticket: Ticket) -> bool:
        """Forget a ticket not used yet (its exchange was abandoned, or its payload is handed
        to the sink in process); whether it was still waiting for its connection."""
        with self._lock:
            return self._expected.pop(ticket.ticket_id, None) is not None

    def pending(self, ticket: Ticket) -> bool:
        """Whether `ticket` is registered and no connection has presented it yet."""
        with self._lock:
            return ticket.ticket_id in self._expected

    def refusals(self) -> dict[str, int]:
        """How many connections were refused, by reason."""
        with self._lock:
            return dict(self._refusals)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                log.error("data plane: accept failed: %r", error)
                continue
            reason = self._admit()
            if reason:
                self._count(reason, f"{peer!r}: over the {reason} limit", warn=False)
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock, peer), daemon=True).start()

    def _admit(self) -> str:
        with self._lock:
            if self._open >= self.settings.max_connections:
                return "max-connections"
            if self._pending >= self.settings.max_pending:
                return "max-pending"
            self._open += 1
            self._pending += 1
            return ""

    def _count(self, reason: str, message: str, *, warn: bool = True) -> None:
        with self._lock:
            self._refusals[reason] += 1
        (log.warning if warn else log.info)("data plane: refused (%s) %s", reason, message)

    def _serve(self, sock: socket.socket, peer: object) -> None:
        release: Callable[[], None] | None = None
        conn = sock
        try:
            try:
                conn = self._secure(sock)
                expected = self._hello(conn)
                release = self._claim_island(expected.ticket)
            finally:
                with self._lock:
                    self._pending -= 1
            self._exchange(conn, expected, release)
        except _Refused as refused:
            self._count(refused.reason, f"{peer!r}: {refused}")
            if refused.tell_peer:
                _send_quietly(conn, refusal_frame(Status.REFUSED, str(refused)))
        finally:
            if release is not None:
                release()
            with self._lock:
                self._open -= 1
            conn.close()

    def _secure(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(self.settings.hello_timeout_s)
        if self._tls is None:
            return sock
        conn = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            conn.do_handshake()  # bounded by the socket's timeout
        except TimeoutError:
            raise _Refused("hello-timeout", "no TLS handshake in time", False) from None
        except (OSError, ssl.SSLError) as error:
            raise _Refused("tls", f"TLS handshake failed: {error!r}", False) from None
        return conn

    def _hello(self, conn: socket.socket) -> _Expected:
        deadline = time.monotonic() + self.settings.hello_timeout_s
        prefix = bytearray(HELLO_PREFIX_BYTES)
        try:
            self._recv(conn, prefix, deadline)
            raw = bytearray(parse_hello_prefix(bytes(prefix)))
            self._recv(conn, raw, deadline)
        except DataPlaneError as error:
            # A peer that sent a whole prefix of something else is told why (a version skew);
            # one that stalled or broke is not.
            timed_out = error.reason in ("stalled", "deadline")
            reason = "timeout" if timed_out else error.reason
            tell = reason not in ("timeout", "broken")
            raise _Refused(f"hello-{reason}", str(error), tell) from None
        try:
            ticket = Ticket.from_bytes(bytes(raw))
            verify_ticket(self._key, self._run_id, ticket, now_unix_s=self._wall_clock())
            # Claimed before the registry is read: a used ticket is refused as a replay even
            # if it were ever registered again.
            self._replays.claim(ticket, now_unix_s=self._wall_clock())
            with self._lock:
                expected = self._expected.get(ticket.ticket_id)
                if expected is None or expected.ticket != ticket:
                    raise TicketRefused("unknown-ticket", "no exchange is registered for it")
                del self._expected[ticket.ticket_id]
        except TicketRefused as error:
            raise _Refused(f"ticket-{error.reason}", str(error), True) from None
        return expected

    def _recv(self, conn: socket.socket, buffer: bytearray, deadline: float) -> None:
        timeout_s = self.settings.hello_timeout_s
        recv_exact_into(
            conn, memoryview(buffer), deadline=deadline, inactivity_s=timeout_s, what="hello"
        )

    def _claim_island(self, ticket: Ticket) -> Callable[[], None]:
        """Take one of the island's exchange slots; returns what gives it back (once)."""
        island = ticket.fields.island
        with self._lock:
            if self._per_island[island] >= self.settings.max_connections_per_island:
                raise _Refused(
                    "island-busy",
                    f"island {island} already runs "
                    f"{self.settings.max_connections_per_island} exchanges",
                    True,
                )
            self._per_island[island] += 1
        claimed = [True]

        def release() -> None:
            with self._lock:
                if claimed:
                    claimed.clear()
                    self._per_island[island] -= 1

        return release

    def _exchange(
        self, conn: socket.socket, expected: _Expected, release: Callable[[], None]
    ) -> None:
        """Read the payload into the sink, send its answer, then tell the sink once the island
        is done with the answer: an island closes its connection when it has decoded it, so a
        coordinator that shares a machine with islands (one of them hosts it) starts its outer
        step after their decoding rather than during it (`_DONE_WAIT_S` at most)."""
        ticket, inactivity_s = expected.ticket, self.settings.inactivity_timeout_s
        reader = PayloadReader(conn, ticket.fields.payload_bytes, expected.deadline, inactivity_s)
        try:
            answered = self._answer(conn, expected, reader)
            release()  # the island's next exchange may begin while this one closes
            if answered:
                _drain_until_closed(conn, _DONE_WAIT_S)
        finally:
            expected.sink.answered(ticket)

    def _answer(self, conn: socket.socket, expected: _Expected, reader: PayloadReader) -> bool:
        """Whether an OK answer was sent whole."""
        ticket, inactivity_s = expected.ticket, self.settings.inactivity_timeout_s
        try:
            answer = expected.sink.on_payload(ticket, reader)
            reader.finish()
        except ExchangeAborted as aborted:
            with self._lock:
                self.exchanges_aborted += 1
            _send_quietly(conn, refusal_frame(Status.ABORTED, str(aborted)))
            return False
        except DataPlaneError as error:
            raise _Refused(error.reason, f"island {ticket.fields.island}: {error}", True) from None
        except Exception as error:  # a sink's bug must not kill the server; the island retries
            log.exception("data plane: the sink failed on island %d", ticket.fields.island)
            raise _Refused("sink-error", f"the coordinator failed: {error!r}", True) from None
        view = answer.contiguous().view(torch.uint8).numpy().data
        try:
            head = memoryview(pack_answer_header(Status.OK, len(view)))
            send_all(
                conn, head, deadline=expected.deadline, inactivity_s=inactivity_s, what="answer"
            )
            send_all(
                conn, view, deadline=expected.deadline, inactivity_s=inactivity_s, what="answer"
            )
        except DataPlaneError as error:
            self._count(f"answer-{error.reason}", f"island {ticket.fields.island}: {error}")
            return False
        with self._lock:
            self.exchanges_completed += 1
        return True


def _send_quietly(conn: socket.socket, frame: bytes) -> None:
    """Best effort, bounded: say why, then close gracefully so that the island, which checks
    for an early answer while it sends, reads the reason rather than a reset (closing with
    its unread bytes in our buffer would send a RST, and the island's kernel would drop the
    reason). At most `_LINGER_S` of the island's bytes are read and dropped meanwhile."""
    with contextlib.suppress(OSError, ssl.SSLError):
        conn.settimeout(_LINGER_S)
        conn.sendall(frame)
        conn.shutdown(socket.SHUT_WR)
    _drain_until_closed(conn, _LINGER_S)


def _drain_until_closed(conn: socket.socket, limit_s: float) -> None:
    """Wait up to `limit_s` for the peer to close its end, dropping what it sends meanwhile;
    a broken connection or the limit ends the wait quietly."""
    with contextlib.suppress(OSError, ssl.SSLError):
        scratch, until = bytearray(1 << 16), time.monotonic() + limit_s
        while (left := until - time.monotonic()) > 0:
            conn.settimeout(left)
            if conn.recv_into(scratch) == 0:
                return
