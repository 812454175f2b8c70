"""The coordinator's data plane: its server, and the exchange groups the control opens on it.

`ExchangeControl` (exchanges.py) decides; this module runs the sockets: a `DataPlaneServer`
(diloco/transports/dataplane/server.py) with TLS from the run's certificate and key (plaintext
only with transport.grpc.insecure, as for grpc), admitting connections by tickets MACed under a
key derived from the run token (the token itself never travels there). Each exchange group is
a `LockstepExchange` over a `LockstepAccumulator` of the lane's codec and size: the weighted
mean of the participants' streams, chunk by chunk in rank order, encoded once and sent back on
each connection. A participant whose payload came on the grpc stream (an Average call) joins
its group from this process (`deliver`), from the bytes the call holds.

The data plane takes the mean's rule only: with transport.aggregate median / trimmed_mean or
transport.clip_norm (which need every payload whole), or a codec without a chunked form (a
plugin's), the coordinator keeps the grpc path (`dataplane_for` returns None).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from diloco.codecs import sum_kernels
from diloco.codecs.base import Codec
from diloco.errors import listen_error
from diloco.transports.dataplane.accumulate import LockstepAccumulator
from diloco.transports.dataplane.buffers import ReusedBuffers
from diloco.transports.dataplane.codec_chunks import chunk_codec
from diloco.transports.dataplane.framing import ChunkReader, ExchangeRefused, StreamError
from diloco.transports.dataplane.lockstep import ExchangeOutcome, LockstepExchange
from diloco.transports.dataplane.server import DataPlaneServer
from diloco.transports.dataplane.tickets import Ticket, TicketFields, derive_ticket_key, new_ticket
from diloco.transports.dataplane.tls import server_context
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.exchanges import GroupEnd, GroupSpec
from diloco.transports.grpc.guard import MIN_BYTES_PER_S
from diloco.transports.grpc.rounds import RoundRules

log = logging.getLogger(__name__)


def dataplane_for(
    settings: GrpcTransportConfig, rules: RoundRules, codec: Codec, token: str
) -> DataPlaneHost | None:
    """The coordinator's data plane, or None where payloads stay on grpc (module docstring)."""
    if not settings.dataplane.enabled:
        return None
    why = ""
    if rules.aggregate != "mean" or rules.clip_norm > 0:
        why = "transport.aggregate / clip_norm need every payload whole"
    else:
        try:
            chunk_codec(codec, 1)
        except ValueError as error:
            why = str(error)
    if why:
        log.warning("payloads travel on grpc, not on the data plane: %s", why)
        return None
    return DataPlaneHost(settings, token, rules.run_id)


def _listen_key(settings: GrpcTransportConfig) -> tuple[str, str]:
    """The key whose host (and port) the data plane binds, and its value."""
    if settings.dataplane.listen:
        return "transport.grpc.dataplane.listen", settings.dataplane.listen
    if settings.listen:
        return "transport.grpc.listen", settings.listen
    return "transport.grpc.address", settings.address


def listen_address(settings: GrpcTransportConfig) -> tuple[str, int]:
    """(host, port) the data plane binds: dataplane.listen, or grpc's host on a free port."""
    if settings.dataplane.listen:
        host, _, port = settings.dataplane.listen.rpartition(":")
        return host.strip("[]"), int(port)
    host = (settings.listen or settings.address).rpartition(":")[0]
    return host.strip("[]"), 0


class MemoryReader:
    """A payload held in memory, read as a data-plane stream (a `ChunkReader`)."""

    def __init__(self, payload: torch.Tensor):
        self._view = payload.contiguous().view(torch.uint8).numpy().data.cast("B")
        self._at = 0

    def read_into(self, view: memoryview) -> None:
        end = self._at + len(view)
        if end > len(self._view):
            raise StreamError(
                "overrun", f"asked for {end} bytes of a {len(self._view)}-byte payload"
            )
        view[:] = self._view[self._at : end]
        self._at = end


class _Group:
    """One exchange group as the server's sink; reports its end once (`report`)."""

    def __init__(
        self,
        spec: GroupSpec,
        exchange: LockstepExchange,
        on_end: Callable[[GroupSpec, GroupEnd], None],
    ):
        self.spec, self.exchange, self.on_end = spec, exchange, on_end
        self.tickets: list[Ticket] = []
        self.connected: set[int] = set()
        self._reported = False
        self._lock = threading.Lock()

    def on_payload(self, ticket: Ticket, reader: ChunkReader) -> torch.Tensor:
        with self._lock:
            self.connected.add(ticket.fields.island)
        try:
            return self.exchange.on_payload(ticket, reader)
        finally:
            self.report()  # before this connection is answered: the round closes first

    def answered(self, ticket: Ticket) -> None:
        self.exchange.answered(ticket)

    def report(self) -> bool:
        """Tell the control how the exchange ended, once; whether it has ended."""
        outcome = self.exchange.outcome(timeout_s=0)
        if outcome is None:
            return False
        with self._lock:
            reported, self._reported = self._reported, True
            connected = set(self.connected)
        if not reported:
            self.on_end(self.spec, self._end(outcome, connected))
        return True

    def _end(self, outcome: ExchangeOutcome, connected: set[int]) -> GroupEnd:
        if outcome.mean_payload is not None:
            return GroupEnd(outcome.mean_payload, answers_sent=self.exchange.answers_sent)
        failure = outcome.failure
        if failure is None:
            return GroupEnd(None, (), "aborted", outcome.aborted)
        failed: tuple[int, ...] = (failure.rank,)
        if failure.reason == "missing":  # every participant that never came, not the first
            failed = tuple(sorted(set(self.spec.weights) - connected)) or failed
        return GroupEnd(None, failed, failure.reason, str(failure))


class DataPlaneHost:
    """The data-plane server of one coordinator (all its lanes) and its live exchange groups.

    Args:
        settings: the transport.grpc section (its dataplane section, TLS files, timeouts).
        token: the run token (tickets are MACed under a key derived from it).
        run_id: transport.run_id (in every ticket's MAC).
    """

    def __init__(self, settings: GrpcTransportConfig, token: str, run_id: str):
        self.settings = settings.dataplane
        self.idle_s = settings.stream_idle_s
        self._key, self._run_id = derive_ticket_key(token, run_id), run_id
        tls = None
        if settings.tls_cert:
            tls = server_context(
                settings.tls_cert, settings.tls_key, ca=settings.tls_ca, mutual=settings.mutual_tls
            )
        listen = listen_address(settings)
        try:
            self.server = DataPlaneServer(
                self.settings,
                key=self._key,
                run_id=run_id,
                tls=tls,
                insecure=tls is None and settings.insecure,
                listen=listen,
            )
        except OSError as error:
            key, value = _listen_key(settings)
            raise listen_error(key, value, error) from None
        self.port = self.server.address[1]
        self._lock = threading.Lock()
        self._groups: list[_Group] = []
        self._by_ticket: dict[bytes, _Group] = {}
        # Each round's encoded mean, in a buffer of an earlier round's once nothing reads it.
        self._means = ReusedBuffers()

    def start(self) -> None:
        # The one-pass sums' kernels load (and are checked against torch's adds) now rather
        # than in the first round: 0.3 s from numba's disk cache, seconds on a machine's first
        # compile, and about 77 MiB of resident memory that does not grow with the model.
        sum_kernels.fma_add_matches_torch()
        self.server.start()
        log.info("data plane listening on port %d", self.port)

    def stop(self) -> None:
        with self._lock:
            groups = list(self._groups)
        for group in groups:
            group.exchange.abort("the coordinator stops")
        self.server.stop()

    def open_group(
        self, spec: GroupSpec, codec: Codec, on_end: Callable[[GroupSpec, GroupEnd], None]
    ) -> dict[int, bytes]:
        """Register one exchange (module docstring); its tickets' wire form by rank."""
        accumulator = LockstepAccumulator(
            codec, spec.numel, chunk_bytes=self.settings.chunk_bytes, buffers=self._means
        )
        connect_by = time.monotonic() + self.settings.hello_timeout_s
        exchange = LockstepExchange(accumulator, spec.weights, deadline=connect_by)
        # Every stream is read by one thread in lockstep, and each answer sent after: the
        # slowest link given time for (MIN_BYTES_PER_S) moves them all within the deadline.
        moved = (len(spec.weights) + 1) * spec.payload_bytes
        ends_by = connect_by + self.idle_s + moved / MIN_BYTES_PER_S
        group = _Group(spec, exchange, on_end)
        tickets: dict[int, bytes] = {}
        for rank in spec.weights:
            fields = TicketFields(
                island=rank,
                round=spec.round,
                attempt=spec.attempt,
                payload_bytes=spec.payload_bytes,
            )
            ticket = new_ticket(self._key, self._run_id, fields, self.settings.ticket_ttl_s)
            group.tickets.append(ticket)
            tickets[rank] = ticket.to_bytes()
        with self._lock:
            self._groups.append(group)
            self._by_ticket.update({ticket.ticket_id: group for ticket in group.tickets})
        for ticket in group.tickets:
            self.server.expect(ticket, group, deadline=ends_by)
        return tickets

    def unused(self, ticket: bytes) -> bool:
        return self.server.pending(Ticket.from_bytes(ticket))

    def poll(self) -> None:
        """Report the groups that ended (one whose participants never all came ends at its
        connect deadline with nobody connected to report it), and forget them."""
        with self._lock:
            groups = list(self._groups)
        for group in groups:
            if not group.report():
                continue
            for ticket in group.tickets:
                self.server.withdraw(ticket)
            with self._lock:
                self._groups.remove(group)
                for ticket in group.tickets:
                    self._by_ticket.pop(ticket.ticket_id, None)

    def deliver(self, ticket: bytes, payload: torch.Tensor) -> torch.Tensor:
        """Take part in `ticket`'s exchange with `payload` (the bytes an Average call carried);
        the encoded mean.

        Raises:
            ExchangeAborted: the attempt failed (another participant): ask for a new ticket.
            ExchangeRefused: the ticket is not waiting for its payload (used, or withdrawn).
        """
        parsed = Ticket.from_bytes(ticket)
        with self._lock:
            group = self._by_ticket.get(parsed.ticket_id)
        if group is None or not self.server.withdraw(parsed):
            raise ExchangeRefused("unknown-ticket", "the ticket is not waiting for a payload")
        try:
            return group.on_payload(parsed, MemoryReader(payload))
        finally:  # the grpc call answers with it, in a thread the host does not see
            group.answered(parsed)
