"""The data plane on loopback: a real server, real sockets (TLS and plaintext), client threads.

Each exchange group is a `LockstepExchange`, as the coordinator will register them; answers
must equal codec.encode(weighted_mean(decoded payloads)) bit for bit, and every refusal must be
counted by the server with its reason.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import self_signed_pair, wait_for

from diloco.aggregate import weighted_mean
from diloco.codecs import build_codec
from diloco.codecs.base import Codec
from diloco.errors import ConfigError
from diloco.transports.dataplane.accumulate import LockstepAccumulator
from diloco.transports.dataplane.client import DataPlaneClient
from diloco.transports.dataplane.config import DataPlaneConfig
from diloco.transports.dataplane.framing import (
    ANSWER_HEADER_BYTES,
    TRAILER,
    DataPlaneError,
    ExchangeAborted,
    ExchangeRefused,
    Status,
    pack_hello,
    parse_answer_header,
)
from diloco.transports.dataplane.lockstep import LockstepExchange
from diloco.transports.dataplane.server import DataPlaneServer
from diloco.transports.dataplane.tickets import (
    Ticket,
    TicketFields,
    derive_ticket_key,
    issue_ticket,
    new_ticket,
)
from diloco.transports.dataplane.tls import client_context, server_context

pytestmark = pytest.mark.timeout(60)

TOKEN = "integration-token-0123456789"
RUN = "run-dataplane"
KEY = derive_ticket_key(TOKEN, RUN)
NUMEL = 200_003
FAST = DataPlaneConfig(
    hello_timeout_s=2.0, inactivity_timeout_s=2.0, chunk_bytes=64 << 10, socket_buffer_bytes=0
)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_pair(tmp_path_factory.mktemp("tls"))


ServerFactory = Callable[..., DataPlaneServer]


@pytest.fixture
def start_server(pem: tuple[Path, Path]) -> Iterator[ServerFactory]:
    servers: list[DataPlaneServer] = []

    def start(
        settings: DataPlaneConfig = FAST, tls: bool = True, mutual: bool = False
    ) -> DataPlaneServer:
        cert, key = pem
        context = server_context(str(cert), str(key), mutual=mutual) if tls else None
        server = DataPlaneServer(settings, key=KEY, run_id=RUN, tls=context, insecure=not tls)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _client(pem: tuple[Path, Path], tls: bool = True, with_cert: bool = False) -> DataPlaneClient:
    cert, key = pem
    if not tls:
        return DataPlaneClient(tls=None, insecure=True, inactivity_timeout_s=5.0)
    context = client_context(
        str(cert), cert=str(cert) if with_cert else "", key=str(key) if with_cert else ""
    )
    return DataPlaneClient(tls=context, inactivity_timeout_s=5.0, socket_buffer_bytes=0)


def _payloads(codec: Codec, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(count)
    return [codec.encode(torch.randn(NUMEL, generator=generator) * (i + 1)) for i in range(count)]


def _group(
    server: DataPlaneServer,
    codec: Codec,
    weights: dict[int, float],
    deadline_s: float = 30.0,
    round: int = 0,
) -> tuple[LockstepExchange, dict[int, Ticket]]:
    accumulator = LockstepAccumulator(codec, NUMEL, chunk_bytes=server.settings.chunk_bytes)
    deadline = time.monotonic() + deadline_s
    exchange = LockstepExchange(accumulator, weights, deadline=deadline)
    tickets = {}
    for rank in weights:
        fields = TicketFields(island=rank, round=round, payload_bytes=codec.payload_bytes(NUMEL))
        tickets[rank] = new_ticket(KEY, RUN, fields, ttl_s=60)
        server.expect(tickets[rank], exchange, deadline=deadline)
    return exchange, tickets


def _in_threads(calls: dict[int, Callable[[], Any]], timeout_s: float = 30) -> dict[int, Any]:
    """Each call in its own thread; its return value or the exception it raised."""
    results: dict[int, Any] = {}

    def run(key: int) -> None:
        try:
            results[key] = calls[key]()
        except Exception as error:  # returned to the test, which checks it
            results[key] = error

    threads = [threading.Thread(target=run, args=(key,), daemon=True) for key in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"
    return results


def _exchange_all(
    client: DataPlaneClient,
    server: DataPlaneServer,
    tickets: dict[int, Ticket],
    payloads: dict[int, torch.Tensor],
    before_trailer: dict[int, Callable[[], None]] | None = None,
) -> dict[int, Any]:
    size = payloads[min(payloads)].numel()
    hooks = before_trailer or {}
    return _in_threads(
        {
            rank: (
                lambda rank=rank: client.exchange(
                    server.address,
                    tickets[rank].to_bytes(),
                    payloads[rank],
                    answer_bytes=size,
                    timeout_s=30,
                    before_trailer=hooks.get(rank),
                )
            )
            for rank in tickets
        }
    )


@pytest.mark.parametrize(
    ("tls", "codec_name", "count"), [(True, "int8", 3), (False, "none", 2), (True, "none", 2)]
)
def test_every_island_gets_the_encoded_weighted_mean(
    start_server: ServerFactory, pem: tuple[Path, Path], tls: bool, codec_name: str, count: int
) -> None:
    server, codec = start_server(tls=tls), build_codec(codec_name)
    weights = {rank: float(rank + 1) for rank in range(count)}
    exchange, tickets = _group(server, codec, weights)
    payloads = dict(enumerate(_payloads(codec, count)))
    answers = _exchange_all(_client(pem, tls), server, tickets, payloads)
    decoded = [codec.decode(payloads[rank], NUMEL) for rank in range(count)]
    expected = codec.encode(weighted_mean(decoded, list(weights.values())))
    for rank in range(count):
        assert isinstance(answers[rank], torch.Tensor), answers[rank]
        assert torch.equal(answers[rank], expected)
    outcome = exchange.outcome(0)
    assert outcome is not None and outcome.mean_payload is not None
    assert torch.equal(outcome.mean_payload, expected)
    wait_for(lambda: server.exchanges_completed == count)  # counted after the answer's send
    assert exchange.answers_sent(10.0)  # the server told the sink (the outer step waits)
    assert server.refusals() == {}


def test_the_answer_can_land_in_the_payload_buffer(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    server, codec = start_server(), build_codec("int8")
    _, tickets = _group(server, codec, {0: 1.0})
    payload = _payloads(codec, 1)[0]
    expected = codec.encode(codec.decode(payload, NUMEL))
    answer = _client(pem).exchange(
        server.address,
        tickets[0].to_bytes(),
        payload,
        answer_bytes=payload.numel(),
        timeout_s=30,
        answer_into=payload,
    )
    assert answer.data_ptr() == payload.data_ptr() and torch.equal(payload, expected)


def test_mutual_tls_refuses_an_island_without_a_certificate(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    server, codec = start_server(mutual=True), build_codec("int8")
    _, tickets = _group(server, codec, {0: 1.0, 1: 1.0})
    payloads = _payloads(codec, 2)
    bare = _client(pem, with_cert=False).exchange
    with pytest.raises(DataPlaneError):
        bare(
            server.address,
            tickets[0].to_bytes(),
            payloads[0],
            answer_bytes=payloads[0].numel(),
            timeout_s=10,
        )
    wait_for(lambda: server.refusals().get("tls", 0) == 1)
    # Ticket 0 was never presented (the handshake failed first): the group still completes.
    answers = _exchange_all(
        _client(pem, with_cert=True), server, tickets, dict(enumerate(payloads))
    )
    assert all(isinstance(answers[rank], torch.Tensor) for rank in (0, 1)), answers


def test_plaintext_against_tls_and_tls_against_plaintext_are_refused(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    codec = build_codec("none")
    payload = _payloads(codec, 1)[0]
    tls_server = start_server(tls=True)
    _, tickets = _group(tls_server, codec, {0: 1.0})
    with pytest.raises(DataPlaneError):
        _client(pem, tls=False).exchange(
            tls_server.address,
            tickets[0].to_bytes(),
            payload,
            answer_bytes=payload.numel(),
            timeout_s=10,
        )
    wait_for(lambda: tls_server.refusals().get("tls", 0) == 1)
    plain_server = start_server(tls=False)
    _, tickets = _group(plain_server, codec, {0: 1.0})
    with pytest.raises(DataPlaneError):
        _client(pem, tls=True).exchange(
            plain_server.address,
            tickets[0].to_bytes(),
            payload,
            answer_bytes=payload.numel(),
            timeout_s=10,
        )
    wait_for(lambda: plain_server.refusals().get("hello-bad-magic", 0) == 1)


def test_an_insecure_server_or_client_must_be_asked_for() -> None:
    with pytest.raises(ConfigError, match="the data plane needs TLS"):
        DataPlaneServer(FAST, key=KEY, run_id=RUN, tls=None)
    with pytest.raises(ConfigError, match="the data plane needs TLS"):
        DataPlaneClient(tls=None)


def _forged(ticket: Ticket, **change: int) -> Ticket:
    """A ticket re-signed by a token holder with a field changed (same id)."""
    fields = TicketFields(**{**ticket.fields.__dict__, **change})
    return issue_ticket(
        KEY, RUN, fields, expires_unix_ms=ticket.expires_unix_ms, ticket_id=ticket.ticket_id
    )


def test_wrong_tickets_are_refused_with_a_reason(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    server, codec = start_server(tls=False), build_codec("none")
    _, tickets = _group(server, codec, {0: 1.0})
    payload = _payloads(codec, 1)[0]
    client = _client(pem, tls=False)
    mac_flipped = bytearray(tickets[0].to_bytes())
    mac_flipped[-1] ^= 1
    expired = issue_ticket(
        KEY,
        RUN,
        tickets[0].fields,
        expires_unix_ms=int((time.time() - 1) * 1000),
        ticket_id=bytes(16),
    )
    attempts = {
        "ticket-forged": bytes(mac_flipped),
        "ticket-unknown-ticket": _forged(tickets[0], round=7).to_bytes(),
        "ticket-expired": expired.to_bytes(),
        "hello-size": b"short",
    }
    for reason, raw in attempts.items():
        with pytest.raises(ExchangeRefused, match="refused the exchange"):
            client.exchange(
                server.address, raw, payload, answer_bytes=payload.numel(), timeout_s=10
            )
        wait_for(lambda reason=reason: server.refusals().get(reason, 0) == 1)


def test_a_used_ticket_is_refused_as_a_replay(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    server, codec = start_server(tls=False), build_codec("int8")
    _, tickets = _group(server, codec, {0: 1.0})
    payload = _payloads(codec, 1)[0]
    client = _client(pem, tls=False)
    client.exchange(
        server.address, tickets[0].to_bytes(), payload, answer_bytes=payload.numel(), timeout_s=10
    )
    with pytest.raises(ExchangeRefused, match="used before"):
        client.exchange(
            server.address,
            tickets[0].to_bytes(),
            payload,
            answer_bytes=payload.numel(),
            timeout_s=10,
        )
    assert server.refusals() == {"ticket-replayed": 1}


def test_a_payload_longer_than_its_ticket_aborts_the_exchange_and_is_named(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    server, codec = start_server(tls=True), build_codec("int8")
    exchange, tickets = _group(server, codec, {0: 1.0, 1: 1.0})
    payloads = dict(enumerate(_payloads(codec, 2)))
    payloads[1] = torch.cat([payloads[1], torch.zeros(100, dtype=torch.uint8)])
    answers = _exchange_all(_client(pem), server, tickets, payloads)
    assert isinstance(answers[0], ExchangeAborted) and isinstance(answers[1], ExchangeAborted), (
        answers
    )
    assert "island 1: the payload is longer than the ticket's" in str(answers[0])
    outcome = exchange.outcome(0)
    assert outcome is not None and outcome.failure is not None
    assert (outcome.failure.rank, outcome.failure.reason) == (1, "too-many-bytes")


@pytest.mark.parametrize("tls", [True, False])
def test_an_island_that_stops_before_its_trailer_fails_the_exchange(
    start_server: ServerFactory, pem: tuple[Path, Path], tls: bool
) -> None:
    """`before_trailer` runs once every payload byte is out; what it raises reaches the
    island's caller, no trailer is sent, and the exchange fails naming that island (its other
    islands ask again): a payload the island finds bad meanwhile is never averaged."""
    server, codec = start_server(tls=tls), build_codec("none")
    exchange, tickets = _group(server, codec, {0: 1.0, 1: 1.0})
    payloads = dict(enumerate(_payloads(codec, 2)))

    class FoundBad(Exception):
        pass

    def stop() -> None:
        raise FoundBad()

    answers = _exchange_all(_client(pem, tls=tls), server, tickets, payloads, {1: stop})
    assert isinstance(answers[1], FoundBad), answers
    assert isinstance(answers[0], ExchangeAborted), answers
    outcome = exchange.outcome(0)
    assert outcome is not None and outcome.failure is not None
    assert outcome.failure.rank == 1 and outcome.mean_payload is None


def _raw_connect(server: DataPlaneServer) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=10)
    return sock


def test_an_idle_island_after_its_hello_times_out_within_the_inactivity_timeout(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    server, codec = start_server(tls=False), build_codec("none")
    exchange, tickets = _group(server, codec, {0: 1.0}, deadline_s=300)  # far: not the limit
    with _raw_connect(server) as sock:
        sock.sendall(pack_hello(tickets[0].to_bytes()))
        sock.sendall(_payloads(codec, 1)[0][:1000].numpy().tobytes())  # then nothing more
        started = time.monotonic()
        head = sock.recv(ANSWER_HEADER_BYTES, socket.MSG_WAITALL)
        waited_s = time.monotonic() - started
    status, _ = parse_answer_header(head)
    assert status == Status.ABORTED
    assert (
        waited_s < 60
    )  # the 2 s inactivity timeout, twice (read, then drain): not the 300 s deadline
    outcome = exchange.outcome(0)
    assert outcome is not None and outcome.failure is not None
    assert (outcome.failure.rank, outcome.failure.reason) == (0, "stalled")


def test_a_connection_without_a_hello_is_dropped_after_the_hello_timeout(
    start_server: ServerFactory,
) -> None:
    server = start_server(tls=True)
    with _raw_connect(server) as sock:
        assert sock.recv(1) == b""  # closed by the server, having said nothing
    assert server.refusals() == {"hello-timeout": 1}  # no TLS handshake
    plain = start_server(tls=False)
    with _raw_connect(plain) as sock:
        sock.sendall(b"DLDP")  # half a hello prefix
        assert sock.recv(1) == b""
    assert plain.refusals() == {"hello-timeout": 1}


def test_32_idle_connections_do_not_stop_a_real_exchange(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    settings = DataPlaneConfig(hello_timeout_s=30.0, inactivity_timeout_s=5.0, chunk_bytes=64 << 10)
    server, codec = start_server(settings, tls=True), build_codec("int8")
    idle = [_raw_connect(server) for _ in range(32)]
    try:
        _, tickets = _group(server, codec, {0: 1.0, 1: 2.0})
        payloads = dict(enumerate(_payloads(codec, 2)))
        answers = _exchange_all(_client(pem), server, tickets, payloads)
        assert all(isinstance(answers[rank], torch.Tensor) for rank in (0, 1)), answers
    finally:
        for sock in idle:
            sock.close()


def test_a_connection_flood_beyond_the_limits_is_refused_at_accept(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    settings = DataPlaneConfig(
        max_connections=6, max_pending=4, hello_timeout_s=5.0, inactivity_timeout_s=5.0
    )
    server, codec = start_server(settings, tls=False), build_codec("none")
    flood = [_raw_connect(server) for _ in range(12)]
    try:
        wait_for(lambda: server.refusals().get("max-pending", 0) == 8)
    finally:
        for sock in flood:
            sock.close()
    # The four admitted ones close before their hello; then real islands get in again.
    wait_for(
        lambda: (
            server.refusals().get("hello-broken", 0) + server.refusals().get("hello-timeout", 0)
            == 4
        )
    )
    _, tickets = _group(server, codec, {0: 1.0})
    payload = _payloads(codec, 1)[0]
    answer = _client(pem, tls=False).exchange(
        server.address, tickets[0].to_bytes(), payload, answer_bytes=payload.numel(), timeout_s=10
    )
    assert torch.equal(answer, payload)


def test_the_total_limit_counts_exchanges_in_progress(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    settings = DataPlaneConfig(max_connections=2, max_pending=2, inactivity_timeout_s=5.0)
    server, codec = start_server(settings, tls=False), build_codec("none")
    client, payloads = _client(pem, tls=False), dict(enumerate(_payloads(codec, 2)))
    _, tickets = _group(server, codec, {0: 1.0, 1: 1.0})
    size = payloads[0].numel()
    first = threading.Thread(
        target=lambda: client.exchange(
            server.address, tickets[0].to_bytes(), payloads[0], answer_bytes=size, timeout_s=30
        ),
        daemon=True,
    )
    first.start()  # admitted, then waits in the group for island 1
    wait_for(lambda: server._per_island[0] == 1)
    with _raw_connect(server):  # the second slot, idle
        wait_for(lambda: server._pending == 1)
        with _raw_connect(server) as extra:
            assert extra.recv(1) == b""  # closed at accept
        assert server.refusals() == {"max-connections": 1}
    wait_for(lambda: server._open == 1)
    client.exchange(
        server.address, tickets[1].to_bytes(), payloads[1], answer_bytes=size, timeout_s=30
    )
    first.join(timeout=30)
    wait_for(lambda: server.exchanges_completed == 2)  # counted after the answer's send


def test_one_island_cannot_hold_more_than_its_share_of_connections(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    settings = DataPlaneConfig(
        max_connections_per_island=1, hello_timeout_s=5.0, inactivity_timeout_s=5.0
    )
    server, codec = start_server(settings, tls=False), build_codec("none")
    client, payloads = _client(pem, tls=False), dict(enumerate(_payloads(codec, 2)))
    _, tickets = _group(server, codec, {0: 1.0, 1: 1.0})
    _, second = _group(server, codec, {0: 1.0}, round=1)  # island 0's other exchange
    size = payloads[0].numel()
    first = threading.Thread(
        target=lambda: client.exchange(
            server.address, tickets[0].to_bytes(), payloads[0], answer_bytes=size, timeout_s=30
        ),
        daemon=True,
    )
    first.start()  # waits in the group for island 1
    wait_for(lambda: server._per_island[0] == 1)
    with pytest.raises(ExchangeRefused, match="island 0 already runs 1 exchanges"):
        client.exchange(
            server.address, second[0].to_bytes(), payloads[0], answer_bytes=size, timeout_s=10
        )
    client.exchange(
        server.address, tickets[1].to_bytes(), payloads[1], answer_bytes=size, timeout_s=30
    )
    first.join(timeout=30)
    assert server.refusals() == {"island-busy": 1}


@pytest.mark.parametrize("tls", [True, False])
def test_an_island_is_done_with_its_answer_only_once_it_closes_the_stream(
    start_server: ServerFactory, pem: tuple[Path, Path], tls: bool
) -> None:
    """The sink hears that an island is done with its answer (`answered`, which the
    coordinator's outer step waits for) when the island closes the connection, and the island
    uses the answer (decodes it) before it closes: so a coordinator that shares the island's
    machine does not step while the island decodes. The island's exchange slot is given back
    as soon as its answer is sent: its next exchange may start meanwhile (one slot here)."""
    settings = DataPlaneConfig(
        max_connections_per_island=1, hello_timeout_s=5.0, inactivity_timeout_s=5.0
    )
    server, codec = start_server(settings, tls=tls), build_codec("int8")
    client, payloads = _client(pem, tls), _payloads(codec, 2)
    exchange, tickets = _group(server, codec, {0: 1.0})
    next_exchange, next_tickets = _group(server, codec, {0: 1.0}, round=1)
    size = codec.payload_bytes(NUMEL)
    seen: dict[str, Any] = {}

    def use(answer: torch.Tensor) -> torch.Tensor:
        seen["done while held"] = exchange.answers_sent(0.3)
        seen["next"] = client.exchange(
            server.address, next_tickets[0].to_bytes(), payloads[1], answer_bytes=size,
            timeout_s=30,
        )  # fmt: skip
        return codec.decode(answer, NUMEL)

    mean = client.exchange(
        server.address, tickets[0].to_bytes(), payloads[0], answer_bytes=size, timeout_s=30,
        use_answer=use,
    )  # fmt: skip
    assert seen["done while held"] is False
    assert exchange.answers_sent(5.0) and next_exchange.answers_sent(5.0)
    expected = codec.encode(weighted_mean([codec.decode(payloads[0], NUMEL)], [1.0]))
    assert torch.equal(mean, codec.decode(expected, NUMEL))
    assert torch.equal(seen["next"], codec.encode(codec.decode(payloads[1], NUMEL)))
    assert server.refusals() == {}


def test_an_island_that_keeps_its_stream_open_delays_nothing_past_the_servers_bound(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diloco.transports.dataplane import server as server_module

    monkeypatch.setattr(server_module, "_DONE_WAIT_S", 0.5)
    server, codec = start_server(tls=False), build_codec("none")
    exchange, tickets = _group(server, codec, {0: 1.0})
    payload = _payloads(codec, 1)[0]
    with _raw_connect(server) as sock:
        sock.sendall(pack_hello(tickets[0].to_bytes()))
        sock.sendall(payload.numpy().tobytes() + TRAILER)
        head = sock.recv(ANSWER_HEADER_BYTES, socket.MSG_WAITALL)
        assert parse_answer_header(head) == (Status.OK, payload.numel())
        left = payload.numel()
        while left and (got := len(sock.recv(min(left, 1 << 20)))):
            left -= got
        assert left == 0  # the whole answer, and the stream is kept open
        started = time.monotonic()
        assert not exchange.answers_sent(0.2)  # the stream is still open
        assert exchange.answers_sent(5.0)  # and never closed: the server's bound ends the wait
        assert 0.2 <= time.monotonic() - started < 3.0


def test_the_client_refuses_a_tls_server_of_another_name(
    start_server: ServerFactory, pem: tuple[Path, Path]
) -> None:
    server, codec = start_server(tls=True), build_codec("none")
    _, tickets = _group(server, codec, {0: 1.0})
    payload = _payloads(codec, 1)[0]
    cert, _ = pem
    client = DataPlaneClient(tls=client_context(str(cert)), server_name="elsewhere.example")
    with pytest.raises(
        DataPlaneError, match="unreachable|CERTIFICATE_VERIFY_FAILED|match"
    ) as caught:
        client.exchange(
            server.address,
            tickets[0].to_bytes(),
            payload,
            answer_bytes=payload.numel(),
            timeout_s=10,
        )
    assert isinstance(caught.value.__context__, ssl.SSLError | type(None))
