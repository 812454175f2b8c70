"""What a token holder can send to the coordinator's data plane, tried on loopback with TLS.

The grpc coordinator runs its data plane (transport.grpc.dataplane); two honest islands
(threads, real `GrpcTransport`s) average through it. The attacker holds the run token and
joins as island 2: it asks for tickets on grpc like an island, then misbehaves on the data
plane with raw sockets. Every attack is refused and counted with its reason, the honest
islands' rounds close with their own payloads, and the shared state never moves by anything
the attacker sent.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from harness import self_signed_pair, wait_for

from diloco.codecs import build_codec
from diloco.codecs.base import HEADER_BYTES
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.dataplane import server as dataplane_server
from diloco.transports.dataplane.config import DataPlaneConfig
from diloco.transports.dataplane.framing import StreamError, pack_hello
from diloco.transports.dataplane.tickets import Ticket, TicketFields
from diloco.transports.dataplane.tls import client_context
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.client import GrpcTransport
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.coordinator import Coordinator
from diloco.transports.grpc.rounds import RoundRules
from diloco.transports.grpc.security import TLS_TARGET_NAME, call_metadata, token_metadata
from diloco.transports.grpc.service import CoordinatorServer

pytestmark = pytest.mark.timeout(120)

NUMEL = 20_000
TOKEN = "dataplane-attack-token-0123456789"
RUN = "run"
ATTACKER = 2
SGD = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
CODEC = build_codec("none")
FAST = DataPlaneConfig(
    hello_timeout_s=1.0,
    inactivity_timeout_s=1.0,
    max_connections=24,
    max_pending=12,
    chunk_bytes=16 << 10,
    socket_buffer_bytes=0,
)


def honest_delta(rank: int, round: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * round + rank)) * 1e-2


@dataclass
class Group:
    coordinator: Coordinator
    server: CoordinatorServer
    settings: GrpcTransportConfig
    cert: Path
    islands: list[GrpcTransport] = field(default_factory=list)
    anchor: torch.Tensor = field(default_factory=lambda: torch.zeros(NUMEL))
    momentum: torch.Tensor = field(default_factory=lambda: torch.zeros(NUMEL))

    @property
    def refusals(self) -> dict[str, int]:
        assert self.server.dataplane is not None
        return self.server.dataplane.server.refusals()

    def honest_round(
        self, ranks: list[int], during: Callable[[], None] = lambda: None
    ) -> list[Any]:
        """One round of islands 0 and 1 (threads); `during` runs meanwhile; their answers are
        checked against the weighted mean of the honest payloads only."""
        round, sha = self.coordinator.round, params_sha256(self.anchor)
        deltas = {rank: honest_delta(rank, round) for rank in ranks}
        results: dict[int, Any] = {}

        def run(rank: int) -> None:
            payload = CODEC.encode(deltas[rank])
            results[rank] = self.islands[rank].average(payload, 100.0, round, sha)

        threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in ranks]
        for thread in threads:
            thread.start()
        during()
        for thread in threads:
            thread.join(60)
        assert len(results) == len(ranks), "an honest island's round did not finish"
        mean = torch.stack([deltas[rank] for rank in ranks]).mean(dim=0)
        for result in results.values():
            assert result.adopt is None and result.participants == len(ranks)
            assert torch.allclose(result.mean, mean, atol=1e-7)
        SGD.step_(self.anchor, results[ranks[0]].mean, {"momentum": self.momentum}, round)
        assert self.coordinator.state_sha256() == params_sha256(self.anchor)
        return [results[rank] for rank in ranks]


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    cert, key = self_signed_pair(tmp_path)
    rules = RoundRules(
        run_id=RUN,
        rounds=20,
        islands=3,
        min_islands=2,
        deadline_floor_s=1.0,
        deadline_ceiling_s=5.0,
    )
    coordinator = Coordinator(rules, CODEC, SGD, pinned={}, state_dir=None)
    listen = GrpcTransportConfig(
        address="127.0.0.1:0", tls_cert=str(cert), tls_key=str(key), dataplane=FAST
    )
    server = CoordinatorServer(coordinator, listen, TOKEN).start()
    settings = GrpcTransportConfig(
        address=f"127.0.0.1:{server.port}", tls_cert=str(cert), tls_key=str(key), retry_s=30
    )
    made = Group(coordinator, server, settings, cert)
    for rank in (0, 1):
        island = GrpcTransport(
            settings, run_id=RUN, token=TOKEN, codec=CODEC, numel=NUMEL, rank=rank, num_islands=3
        )
        island.join([], {"model": "m"})
        made.islands.append(island)
    state = SharedState(0, made.anchor.clone(), {"momentum": made.momentum.clone()})
    assert made.islands[0].shared_state(state) is None
    yield made
    for island in made.islands:
        island.close()
    server.stop(0)


class Attacker:
    """Island 2, holding the run token: raw grpc calls and raw data-plane sockets."""

    def __init__(self, group: Group):
        self.group = group
        credentials = grpc.ssl_channel_credentials(group.cert.read_bytes())
        options = [("grpc.ssl_target_name_override", TLS_TARGET_NAME)]
        address = group.settings.address
        self.stub = pb_grpc.CoordinatorStub(grpc.secure_channel(address, credentials, options))
        join = pb.JoinRequest(run_id=RUN, rank=ATTACKER, fingerprint={"model": "m"}, host="x")
        self.session = self.stub.Join(join, metadata=token_metadata(TOKEN), timeout=10).session
        assert group.server.dataplane is not None
        self.port = group.server.dataplane.port
        self.tls = client_context(str(group.cert))

    def ask_ticket(self, round: int, sha: str) -> pb.AverageReply:
        """An Exchange call, as an island's: blocks until the round's participants are fixed."""
        header = pb.AverageHeader(
            run_id=RUN,
            rank=ATTACKER,
            round=round,
            weight=100.0,
            params_sha256=sha,
            payload_bytes=CODEC.payload_bytes(NUMEL),
        )
        metadata = call_metadata(TOKEN, ATTACKER, self.session)
        return next(iter(self.stub.Exchange(header, metadata=metadata, timeout=30))).reply

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return self.tls.wrap_socket(sock, server_hostname=TLS_TARGET_NAME)

    def send(self, ticket: bytes, body: bytes) -> bytes:
        """Hello with `ticket`, then `body`; what the server answers before closing."""
        with self.connect() as conn:
            conn.sendall(pack_hello(ticket) + body)
            return _read_all(conn)


def _read_all(conn: socket.socket) -> bytes:
    got = b""
    conn.settimeout(15)
    try:
        while chunk := conn.recv(1 << 16):
            got += chunk
    except (OSError, ssl.SSLError):
        pass
    return got


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except Exception as error:  # the test checks it
            out["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_forged_and_altered_tickets_are_refused_and_the_round_closes(group: Group) -> None:
    attacker = Attacker(group)
    fields = TicketFields(island=ATTACKER, round=0, payload_bytes=CODEC.payload_bytes(NUMEL))
    forged = Ticket(b"\x01" * 16, fields, int(time.time() * 1000) + 60_000, b"\x00" * 32)
    answers = {}

    def attack() -> None:
        answers["forged"] = attacker.send(forged.to_bytes(), b"")
        answers["garbage"] = attacker.send(b"\x07" * len(forged.to_bytes()), b"")

    before = group.coordinator.state_sha256()
    group.honest_round([0, 1], during=attack)
    assert group.refusals.get("ticket-forged", 0) == 2, group.refusals
    assert b"MAC does not match" in answers["forged"]
    assert group.coordinator.stats.participants == [2]
    assert before != group.coordinator.state_sha256()  # moved by the honest islands only


def test_a_replayed_ticket_is_refused(group: Group) -> None:
    attacker = Attacker(group)
    sha = group.coordinator.state_sha256()
    payload = CODEC.encode(torch.zeros(NUMEL)).numpy().tobytes()
    replies: dict[str, Any] = {}

    def take_part() -> None:
        reply = attacker.ask_ticket(0, sha)
        replies["ticket"] = bytes(reply.ticket)
        replies["answer"] = attacker.send(replies["ticket"], payload + b"DLDP-END")

    thread, _ = in_thread(take_part)
    # The attacker takes part with a zero payload: the round is the mean of three.
    round, anchor = 0, params_sha256(group.anchor)
    deltas = {rank: honest_delta(rank, round) for rank in (0, 1)}
    results: dict[int, Any] = {}
    islands = [
        threading.Thread(
            target=lambda r=rank: results.update(
                {r: group.islands[r].average(CODEC.encode(deltas[r]), 100.0, round, anchor)}
            ),
            daemon=True,
        )
        for rank in (0, 1)
    ]
    for island in islands:
        island.start()
    for island in islands + [thread]:
        island.join(60)
    assert results[0].participants == 3 and len(replies["answer"]) > 0
    replayed = attacker.send(replies["ticket"], payload + b"DLDP-END")
    assert b"used before" in replayed
    assert group.refusals.get("ticket-replayed", 0) == 1
    assert group.coordinator.stats.participants == [3]


def test_a_short_stream_is_dropped_and_the_honest_islands_resend(group: Group) -> None:
    """The attacker sends half its payload and stalls: the exchange's read of it times out,
    the attempt is aborted, and the honest islands' new attempt closes the round without it.
    Asking again, the attacker gets the round's mean, late."""
    attacker = Attacker(group)
    sha = group.coordinator.state_sha256()
    payload = CODEC.encode(torch.zeros(NUMEL)).numpy().tobytes()
    late: dict[str, Any] = {}

    def stall() -> None:
        reply = attacker.ask_ticket(0, sha)
        with attacker.connect() as conn:
            conn.sendall(pack_hello(bytes(reply.ticket)) + payload[: len(payload) // 2])
            late["closed"] = _read_all(conn)
        late["again"] = attacker.ask_ticket(0, sha)

    thread, out = in_thread(stall)
    group.honest_round([0, 1])
    thread.join(60)
    assert "error" not in out, out
    assert late["again"].late and not late["again"].ticket and late["again"].participants == 2
    assert group.coordinator.stats.dropped_payloads == 1
    assert group.coordinator.stats.refused_payloads == 0
    assert group.server.dataplane is not None
    assert group.server.dataplane.server.exchanges_aborted >= 2


def test_a_longer_or_non_finite_payload_is_refused_and_never_reaches_the_state(
    group: Group,
) -> None:
    attacker = Attacker(group)
    for round, attack in enumerate(("longer", "nan")):
        sha = group.coordinator.state_sha256()
        payload = CODEC.encode(torch.zeros(NUMEL))
        if attack == "nan":
            payload[HEADER_BYTES:].view(torch.float32)[5] = float("nan")
        body = payload.numpy().tobytes() + (b"extra bytes!" if attack == "longer" else b"DLDP-END")
        seen: dict[str, Any] = {}

        def cheat(sha: str = sha, body: bytes = body, seen: dict[str, Any] = seen) -> None:
            reply = attacker.ask_ticket(group.coordinator.round, sha)
            seen["answer"] = attacker.send(bytes(reply.ticket), body)
            try:
                attacker.ask_ticket(reply.round, sha)
            except grpc.RpcError as error:
                seen["code"], seen["details"] = error.code(), error.details()

        thread, _ = in_thread(cheat)
        group.honest_round([0, 1])
        thread.join(60)
        assert seen.get("code") == grpc.StatusCode.INVALID_ARGUMENT, (attack, seen)
        expected = "longer than the ticket" if attack == "longer" else "non-finite"
        assert expected in seen["details"], seen["details"]
        assert group.coordinator.stats.refused_payloads == round + 1
    assert group.coordinator.stats.participants == [2, 2]


def test_slowloris_and_a_flood_on_the_data_port_are_bounded(group: Group) -> None:
    """Connections that never say hello are closed after hello_timeout_s; past max_pending
    and max_connections new ones are closed at accept. Meanwhile the honest rounds close."""
    attacker = Attacker(group)
    held: list[socket.socket] = []

    def flood() -> None:
        for _ in range(40):  # more than max_connections, none saying a word
            with contextlib.suppress(OSError):
                held.append(socket.create_connection(("127.0.0.1", attacker.port), timeout=5))

    group.honest_round([0, 1], during=flood)
    wait_for(lambda: group.refusals.get("hello-timeout", 0) >= 1)
    refusals = group.refusals
    assert refusals.get("max-pending", 0) + refusals.get("max-connections", 0) >= 1, refusals
    group.honest_round([0, 1])  # the silent connections are gone: the next round too
    for sock in held:
        sock.close()
    assert group.coordinator.stats.participants == [2, 2]
    assert group.coordinator.stats.refused_payloads == 0


def test_an_island_reads_the_mean_into_its_payloads_buffer(group: Group) -> None:
    """No model-sized buffer is allocated for the answer: the payload was handed over."""
    round, sha = group.coordinator.round, params_sha256(group.anchor)
    payloads = {rank: CODEC.encode(honest_delta(rank, round)) for rank in (0, 1)}
    expected = torch.stack([honest_delta(rank, round) for rank in (0, 1)]).mean(dim=0)
    results: dict[int, Any] = {}

    def run(rank: int) -> None:
        results[rank] = group.islands[rank].average(payloads[rank], 100.0, round, sha)

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for rank in (0, 1):
        mean = results[rank].mean
        assert mean.untyped_storage().data_ptr() == payloads[rank].untyped_storage().data_ptr()
        assert torch.allclose(mean, expected, atol=1e-7)
        assert torch.equal(payloads[rank][HEADER_BYTES:].view(torch.float32), mean)


def break_the_first_answer(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The coordinator's first answer on the data plane breaks after half its bytes; returns
    the list that records the broken answer's size."""
    send_all = dataplane_server.send_all
    broken: list[int] = []

    def break_first_answer(
        conn: socket.socket, view: memoryview, *, deadline: float, inactivity_s: float, what: str
    ) -> None:
        if what == "answer" and len(view) > HEADER_BYTES and not broken:
            broken.append(len(view))
            half = view[: len(view) // 2]
            send_all(conn, half, deadline=deadline, inactivity_s=inactivity_s, what=what)
            raise StreamError("broken", "this test breaks the answer")
        send_all(conn, view, deadline=deadline, inactivity_s=inactivity_s, what=what)

    monkeypatch.setattr(dataplane_server, "send_all", break_first_answer)
    return broken


def test_an_answer_that_breaks_midway_still_gives_the_island_the_mean(
    group: Group, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator's answer to one island breaks after half its bytes: that island's
    payload buffer holds half a mean, so it cannot send again; it asks again and gets the
    round's mean on grpc (the exchange had completed), and the state is the honest one."""
    broken = break_the_first_answer(monkeypatch)
    group.honest_round([0, 1])  # checks both means and the coordinator's state
    assert broken == [CODEC.payload_bytes(NUMEL)]
    assert group.refusals.get("answer-broken") == 1


def test_a_spent_payload_is_never_sent_again(group: Group, monkeypatch: pytest.MonkeyPatch) -> None:
    """After its answer broke, an island handed a ticket again (as by a coordinator restarted
    from an older state) does not send the half-overwritten payload: it asks until it gets
    the round's mean."""
    break_the_first_answer(monkeypatch)
    asks: dict[int, int] = {}
    exchanges: dict[int, int] = {}
    for rank, island in enumerate(group.islands):
        ask, exchange = island._ask, island._dataplane.exchange  # type: ignore[union-attr]

        def asking(
            header: Any, timeout_s: float, *args: Any, rank: int = rank, ask: Any = ask
        ) -> Any:
            asks[rank] = asks.get(rank, 0) + 1
            if asks[rank] == 2:  # the ask right after the broken answer: a ticket again
                return pb.AverageReply(
                    round=header.round, ticket=b"t" * 64, dataplane_port=1
                ), iter(())
            return ask(header, timeout_s, *args)

        def exchanging(*args: Any, rank: int = rank, exchange: Any = exchange, **kw: Any) -> Any:
            exchanges[rank] = exchanges.get(rank, 0) + 1
            return exchange(*args, **kw)

        monkeypatch.setattr(island, "_ask", asking)
        monkeypatch.setattr(island._dataplane, "exchange", exchanging)
    group.honest_round([0, 1])
    assert exchanges == {0: 1, 1: 1}  # one data-plane exchange each: nothing sent again
    assert sorted(asks.values()) == [1, 3]  # the broken one asked for the mean after the ticket
