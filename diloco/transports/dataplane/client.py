"""The island's side of a data-plane exchange: send one payload on a ticket, get the answer.

One connection per exchange: connect, TLS (unless insecure), hello with the ticket, the
payload straight from its tensor's buffer (a memoryview: no copy in Python), the trailer, then
the answer read into one preallocated tensor. Wire format: framing.py. Every read and write
waits at most `inactivity_timeout_s`, and the whole exchange ends by `timeout_s`.

What the caller does with each error: ExchangeAborted -> ask the control plane for a new
ticket (another island failed; resend); ExchangeRefused -> the server will not take this
ticket (ask the control plane what to do); StreamError / DataPlaneError("unreachable") ->
the connection failed: ask the control plane, which knows whether the round still waits
(AnswerBroken, a StreamError after the answer's OK header: the exchange had completed, so
the control plane has the round's mean for it).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable

import torch

from diloco.codecs.base import empty
from diloco.errors import ConfigError
from diloco.transports.dataplane.config import KEY
from diloco.transports.dataplane.framing import (
    ANSWER_HEADER_BYTES,
    MAX_REASON_BYTES,
    SEND_SLICE_BYTES,
    TRAILER,
    AnswerBroken,
    DataPlaneError,
    ExchangeAborted,
    ExchangeRefused,
    Status,
    StreamError,
    pack_hello,
    parse_answer_header,
    recv_exact_into,
    send_all,
    tune_socket,
)
from diloco.transports.dataplane.tls import TLS_SERVER_NAME

_CPU = torch.device("cpu")


class DataPlaneClient:
    """Runs exchanges for one island; holds no connection between them. Thread-safe."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None,
        insecure: bool = False,
        inactivity_timeout_s: float = 60.0,
        socket_buffer_bytes: int = 0,
        server_name: str = TLS_SERVER_NAME,
    ):
        """
        Args:
            tls: a client context (`tls.client_context`); None only with `insecure`.
            server_name: the name the server's certificate must carry.
        """
        if tls is None and not insecure:
            raise ConfigError(
                f"{KEY}: the data plane needs TLS (transport.grpc.tls_cert), or "
                "transport.grpc.insecure=true for a loopback experiment"
            )
        self.tls, self.server_name = tls, server_name
        self.inactivity_timeout_s = inactivity_timeout_s
        self.socket_buffer_bytes = socket_buffer_bytes

    def exchange(
        self,
        address: tuple[str, int],
        ticket: bytes,
        payload: torch.Tensor,
        *,
        answer_bytes: int,
        timeout_s: float,
        answer_into: torch.Tensor | None = None,
        before_trailer: Callable[[], None] | None = None,
        use_answer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Send `payload` (a contiguous uint8 CPU tensor) on `ticket`; return the answer, or
        what `use_answer` makes of it.

        Args:
            ticket: the wire form the control plane handed out (`Ticket.to_bytes()`).
            answer_bytes: the answer's exact size (the mean payload's; larger is refused).
            timeout_s: the whole exchange's limit, from now.
            answer_into: a uint8 tensor of `answer_bytes` to receive into (it may be
                `payload` itself: it is fully sent before any answer byte arrives; but an
                answer that breaks, AnswerBroken, then leaves no payload to resend).
            before_trailer: called once the payload's bytes are sent, before its trailer;
                what it raises ends the exchange there (the server, missing the trailer,
                drops the stream) and reaches the caller.
            use_answer: applied to the answer before the connection closes (the island's
                decoding of the mean): the server takes the close as the island's word that
                it is done with the answer, and a coordinator sharing this machine starts its
                outer step only then, not while the island decodes.

        Raises:
            ExchangeAborted, ExchangeRefused, StreamError, DataPlaneError: see the module
                docstring.
        """
        if payload.dtype != torch.uint8 or not payload.is_contiguous() or payload.is_cuda:
            raise ValueError("the payload must be a contiguous uint8 CPU tensor")
        deadline = time.monotonic() + timeout_s
        conn = self._connect(address, deadline)
        try:
            try:
                early = self._send(conn, ticket, payload, deadline, before_trailer)
            except StreamError:
                # A server that refuses (or aborts) says why, then stops reading: the reason
                # may still be in the receive buffer.
                self._raise_status(conn)
                raise
            answer = self._receive(conn, answer_bytes, answer_into, deadline, early)
            return answer if use_answer is None else use_answer(answer)
        finally:
            conn.close()

    def _raise_status(self, conn: socket.socket) -> None:
        """Raise the server's refusal or abort if it can be read at once; else return."""
        try:
            self._receive(conn, 0, None, time.monotonic() + 1.0, b"")
        except (ExchangeAborted, ExchangeRefused):
            raise
        except (DataPlaneError, ValueError):
            pass

    def _connect(self, address: tuple[str, int], deadline: float) -> socket.socket:
        host, port = address
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as error:
            raise DataPlaneError("unreachable", f"data plane {address!r}: {error}") from None
        try:
            tune_socket(sock, self.socket_buffer_bytes)
            sock.settimeout(max(0.001, min(self.inactivity_timeout_s, deadline - time.monotonic())))
            sock.connect(sockaddr)
            if self.tls is None:
                return sock
            return self.tls.wrap_socket(sock, server_hostname=self.server_name)
        except (OSError, ssl.SSLError) as error:
            sock.close()
            raise DataPlaneError("unreachable", f"data plane {address!r}: {error!r}") from None

    def _send(
        self,
        conn: socket.socket,
        ticket: bytes,
        payload: torch.Tensor,
        deadline: float,
        before_trailer: Callable[[], None] | None,
    ) -> bytes:
        """Hello, payload, trailer; returns the first bytes of an answer that arrived before
        the payload was all sent (a refusal or an abort: stop sending), else b""."""
        wait_s = self.inactivity_timeout_s
        hello = memoryview(pack_hello(ticket))
        send_all(conn, hello, deadline=deadline, inactivity_s=wait_s, what="hello")
        view = payload.numpy().data
        for start in range(0, len(view), SEND_SLICE_BYTES):
            part = view[start : start + SEND_SLICE_BYTES]
            send_all(conn, part, deadline=deadline, inactivity_s=wait_s, what="payload")
            early = _early_answer(conn)
            if early:
                return early
        if before_trailer is not None:
            before_trailer()
        send_all(conn, memoryview(TRAILER), deadline=deadline, inactivity_s=wait_s, what="trailer")
        return b""

    def _receive(
        self,
        conn: socket.socket,
        answer_bytes: int,
        answer_into: torch.Tensor | None,
        deadline: float,
        early: bytes,
    ) -> torch.Tensor:
        wait_s = self.inactivity_timeout_s
        head = bytearray(ANSWER_HEADER_BYTES)
        head[: len(early)] = early
        rest = memoryview(head)[len(early) :]
        recv_exact_into(conn, rest, deadline=deadline, inactivity_s=wait_s, what="answer")
        status, length = parse_answer_header(bytes(head))
        if status != Status.OK:
            reason = bytearray(min(length, MAX_REASON_BYTES))
            recv_exact_into(
                conn, memoryview(reason), deadline=deadline, inactivity_s=wait_s, what="reason"
            )
            text = reason.decode("utf-8", "replace")
            if status == Status.ABORTED:
                raise ExchangeAborted("aborted", f"the server aborted the exchange: {text!r}")
            raise ExchangeRefused("refused", f"the server refused the exchange: {text!r}")
        if length != answer_bytes:
            raise StreamError(
                "broken", f"the answer announces {length} bytes, expected {answer_bytes}"
            )
        answer = answer_into if answer_into is not None else empty(length, torch.uint8, _CPU)
        if answer.dtype != torch.uint8 or answer.numel() != length or not answer.is_contiguous():
            raise ValueError(f"answer_into must be a contiguous uint8 tensor of {length} bytes")
        try:
            recv_exact_into(
                conn, answer.numpy().data, deadline=deadline, inactivity_s=wait_s, what="answer"
            )
        except StreamError as error:
            raise AnswerBroken(error.reason, str(error)) from None
        return answer


def _early_answer(conn: socket.socket) -> bytes:
    """Up to an answer header's worth of bytes if the server already said something, else
    b"" (one poll, no wait). TLS 1.3 sends session tickets after the handshake: they make the
    socket readable, but a read of them yields no application bytes (SSLWantReadError)."""
    pending = isinstance(conn, ssl.SSLSocket) and conn.pending() > 0
    if not pending and not select.select([conn], [], [], 0)[0]:
        return b""
    conn.setblocking(False)
    try:
        data = conn.recv(ANSWER_HEADER_BYTES)
    except (ssl.SSLWantReadError, BlockingIOError):
        return b""
    except (OSError, ssl.SSLError) as error:
        raise StreamError("broken", f"payload: {error!r} while sending") from None
    if not data:
        raise StreamError("broken", "payload: the server closed the connection while sending")
    return data
