"""The grpc transport in one process: a real coordinator server on loopback and real clients
(threads), to check the mean it computes and the payloads it refuses.

Refused payloads must never reach the shared parameters: each refusal test compares the
coordinator's state hash before and after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from harness import run_threads, self_signed_pair, wait_for

from diloco.aggregate import weighted_mean
from diloco.codecs import build_codec
from diloco.codecs.base import HEADER_BYTES, Codec
from diloco.errors import ConfigError
from diloco.outer.nesterov import nesterov_step_
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.base import GroupMismatchError
from diloco.transports.dataplane.config import DataPlaneConfig
from diloco.transports.grpc import (
    Coordinator,
    CoordinatorServer,
    GrpcTransport,
    PayloadRefusedError,
    RoundRules,
)
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.security import call_metadata, token_metadata

NUMEL = 10_000
TOKEN = "integration-token-0123456789"
FINGERPRINT = {"model": "m1", "outer.inner_steps": "5"}
SGD = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


class Running:
    """A coordinator server on loopback (port 0: the OS picks it) and its islands' settings."""

    def __init__(self, tmp_path: Path, codec_name: str, islands: int = 2, dataplane: bool = True):
        self.tmp_path = tmp_path
        self.codec = build_codec(codec_name)
        rules = RoundRules(run_id="run", rounds=10, islands=islands, min_islands=islands)
        self.coordinator = Coordinator(
            rules, self.codec, SGD, pinned={}, state_dir=tmp_path / "coordinator"
        )
        paths = DataPlaneConfig(enabled=dataplane)
        listen = GrpcTransportConfig(
            address="127.0.0.1:0", insecure=True, retry_s=5, dataplane=paths
        )
        self.server = CoordinatorServer(self.coordinator, listen, TOKEN).start()
        self.settings = GrpcTransportConfig(
            address=f"127.0.0.1:{self.server.port}", insecure=True, retry_s=5, dataplane=paths
        )

    def client(self, rank: int, token: str = TOKEN, islands: int = 2) -> GrpcTransport:
        return GrpcTransport(
            self.settings,
            run_id="run",
            token=token,
            codec=self.codec,
            numel=NUMEL,
            rank=rank,
            num_islands=islands,
            session_file=self.session_file(rank),
        )

    def session_file(self, rank: int) -> Path:
        return self.tmp_path / f"island-{rank}" / "grpc-session"

    def metadata(self, rank: int) -> tuple[tuple[str, str], ...]:
        """What a call of island `rank` carries: the token, its rank and its session."""
        return call_metadata(TOKEN, rank, self.session_file(rank).read_text())


@pytest.fixture
def coordinator(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Running]:
    running = Running(tmp_path, getattr(request, "param", "none"))
    yield running
    running.server.stop(0)


def initial_state() -> SharedState:
    generator = torch.Generator().manual_seed(0)
    return SharedState(0, torch.randn(NUMEL, generator=generator), {"momentum": torch.zeros(NUMEL)})


def delta(rank: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 + rank)) * 1e-2


def seeded(coordinator: Running) -> GrpcTransport:
    """Island 0, joined, having seeded the shared state."""
    island = coordinator.client(0)
    island.join([], FINGERPRINT)
    assert island.shared_state(initial_state()) is None
    return island


@pytest.mark.timeout(60)
@pytest.mark.parametrize("coordinator", ["none", "int8"], indirect=True)
def test_two_islands_get_the_re_encoded_weighted_mean(coordinator: Running) -> None:
    state = initial_state()
    sha = params_sha256(state.anchor)
    codec = coordinator.codec
    weights = [100.0, 300.0]

    def island(rank: int) -> tuple[torch.Tensor, int]:
        transport = coordinator.client(rank)
        transport.join([], FINGERPRINT)
        transport.shared_state(state)
        result = transport.average(codec.encode(delta(rank)), weights[rank], 0, sha)
        transport.close()
        return result.mean, result.participants

    (mean0, n0), (mean1, n1) = run_threads(island, [(0,), (1,)], timeout_s=45)
    decoded = [codec.decode(codec.encode(delta(rank)), NUMEL) for rank in range(2)]
    exact = weighted_mean(decoded, weights)
    expected = codec.decode(codec.encode(exact), NUMEL)
    assert n0 == n1 == 2
    assert torch.equal(mean0, expected) and torch.equal(mean1, expected)

    anchor, momentum = state.anchor.clone(), torch.zeros(NUMEL)
    nesterov_step_(anchor, expected, momentum, lr=0.7, mu=0.9)
    assert coordinator.coordinator.state_sha256() == params_sha256(anchor)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("codec_name", ["none", "int8"])
def test_the_data_plane_and_the_grpc_stream_give_the_same_bits(
    tmp_path: Path, codec_name: str
) -> None:
    """Rounds of unequal weights through each path: the same means, the same shared state;
    the data plane carried every payload (and the grpc path none)."""
    seen = {}
    for dataplane in (True, False):
        running = Running(tmp_path / f"dataplane-{dataplane}", codec_name, dataplane=dataplane)
        state = initial_state()
        anchor, momentum = state.anchor.clone(), torch.zeros(NUMEL)

        def island(rank: int, running: Running = running) -> list[bytes]:
            transport = running.client(rank)
            transport.join([], FINGERPRINT)
            transport.shared_state(initial_state())
            local, buffer, means = initial_state().anchor, torch.zeros(NUMEL), []
            for round in range(3):
                payload = running.codec.encode(delta(rank) * (round + 1))
                result = transport.average(payload, 100.0 + 50 * rank, round, params_sha256(local))
                nesterov_step_(local, result.mean, buffer, lr=0.7, mu=0.9)
                means.append(result.mean.numpy().tobytes())
            transport.close()
            return means

        try:
            means = run_threads(island, [(0,), (1,)], timeout_s=60)
            assert means[0] == means[1]
            for mean in means[0]:
                nesterov_step_(
                    anchor,
                    torch.frombuffer(bytearray(mean), dtype=torch.float32),
                    momentum,
                    lr=0.7,
                    mu=0.9,
                )
            assert running.coordinator.state_sha256() == params_sha256(anchor)
            host = running.server.dataplane
            if dataplane:
                assert host is not None
                server = host.server  # counts an exchange once its answer is sent:
                wait_for(lambda: server.exchanges_completed == 6)  # noqa: B023 (waited here)
            else:
                assert host is None
            seen[dataplane] = (means[0], running.coordinator.state_sha256())
        finally:
            running.server.stop(0)
    assert seen[True] == seen[False]


@pytest.mark.timeout(60)
def test_a_newcomer_downloads_the_shared_state(coordinator: Running) -> None:
    seeded(coordinator)
    newcomer = coordinator.client(1)
    newcomer.join([], FINGERPRINT)
    fresh = SharedState(0, torch.zeros(NUMEL), {"momentum": torch.zeros(NUMEL)})
    got = newcomer.shared_state(fresh)
    assert got is not None
    assert torch.equal(got.anchor, initial_state().anchor)
    # Holding it already: nothing to download.
    assert newcomer.shared_state(got) is None


@pytest.mark.timeout(60)
def test_wrong_token_is_refused_and_not_echoed(coordinator: Running) -> None:
    intruder = coordinator.client(0, token="someone-elses-token-xyz")
    with pytest.raises(ConfigError, match="refused the run token") as error:
        intruder.join([], FINGERPRINT)
    assert "someone-elses" not in str(error.value)
    assert coordinator.server.refused_calls >= 1
    assert not coordinator.coordinator.has_state()


@pytest.mark.timeout(60)
def test_another_model_is_refused_naming_the_difference(coordinator: Running) -> None:
    """Changed on purpose (issue 12, item 5): the refusal names the differing key, never the
    group's value (it stays in the coordinator's log)."""
    seeded(coordinator)
    other = coordinator.client(1)
    with pytest.raises(GroupMismatchError, match="differing keys: model$") as error:
        other.join([], {**FINGERPRINT, "model": "m2"})
    assert "m1" not in str(error.value)


def nan_payload(codec: Codec) -> torch.Tensor:
    """A payload holding a NaN: our codecs refuse to encode one; a buggy or hostile island may
    not use them."""
    payload = codec.encode(delta(0))
    payload[HEADER_BYTES:].view(torch.float32)[17] = float("nan")
    return payload


def found_bad_after(seconds: float, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The island's payload check finds the payload bad after `seconds`; set once it has."""
    from diloco.transports.grpc import client as client_module

    checked = threading.Event()

    def slow_check(*args: object) -> bool:
        time.sleep(seconds)
        checked.set()
        return False

    monkeypatch.setattr(client_module, "decodes_finite", slow_check)
    return checked


def assert_refused_once_and_unchanged(coordinator: Running, before: str) -> None:
    """One payload refused, no round closed, the shared state as it was."""
    assert coordinator.coordinator.state_sha256() == before
    assert coordinator.coordinator.round == 0
    assert coordinator.coordinator.stats.refused_payloads == 1


@pytest.mark.timeout(60)
def test_nan_payload_is_refused_and_the_state_is_unchanged(coordinator: Running) -> None:
    island = seeded(coordinator)
    before = coordinator.coordinator.state_sha256()
    with pytest.raises(PayloadRefusedError, match="non-finite"):
        island.average(nan_payload(coordinator.codec), 10.0, 0, before)
    assert_refused_once_and_unchanged(coordinator, before)


@pytest.mark.timeout(60)
def test_a_payload_found_bad_while_its_header_waits_is_refused_at_once(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The island checks its payload while the header waits for the round's participants
    (here forever: the round needs 2 islands, 1 came); a bad one cancels that wait and is
    refused on grpc at once. A good one waits as before, its check long done."""
    island = seeded(coordinator)
    before = coordinator.coordinator.state_sha256()
    checked = found_bad_after(0.5, monkeypatch)  # the header is waiting by then
    start = time.monotonic()
    with pytest.raises(PayloadRefusedError, match="non-finite"):
        island.average(nan_payload(coordinator.codec), 10.0, 0, before)
    assert checked.is_set() and time.monotonic() - start < 10
    assert_refused_once_and_unchanged(coordinator, before)


@contextlib.contextmanager
def round_of_one(tmp_path: Path) -> Iterator[tuple[Running, Any, str]]:
    """A coordinator whose rounds take one island, that island joined and seeded: (the
    running coordinator, the island, the shared state's hash)."""
    running = Running(tmp_path, "none", islands=1)
    try:
        island = running.client(0, islands=1)
        island.join([], FINGERPRINT)
        assert island.shared_state(initial_state()) is None
        yield running, island, running.coordinator.state_sha256()
    finally:
        running.server.stop(0)


@pytest.mark.timeout(60)
def test_a_payload_found_bad_while_it_streams_is_refused_and_never_averaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round of one island: its ticket comes at once and its payload streams while the
    check runs; the check's verdict comes before the payload's trailer, so the data plane
    never takes the payload (the round goes on without it), and the island says why."""
    from diloco.transports.grpc import client as client_module

    with round_of_one(tmp_path) as (running, island, before):
        sent: list[int] = []
        exchange = client_module.IslandDataPlane.exchange

        def exchanging(self: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append(1)
            return exchange(self, *args, **kwargs)

        monkeypatch.setattr(client_module.IslandDataPlane, "exchange", exchanging)
        found_bad_after(0.5, monkeypatch)  # the payload is on its way by then
        with pytest.raises(PayloadRefusedError, match="not decode to finite values"):
            island.average(nan_payload(running.codec), 10.0, 0, before)
        assert sent == [1]  # it went on the data plane first
        # Not averaged: the round closed without a participant (a zero mean, no momentum yet).
        assert running.coordinator.state_sha256() == before


@pytest.mark.timeout(60)
def test_a_payload_said_to_be_checked_is_not_read_again_and_still_never_averaged_if_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`average_into(..., checked_finite=True)` (OuterSync, whose pseudo-gradient is checked
    before it is encoded) skips the island's own pass over the payload; a caller that says so
    of a bad payload gets it refused by the coordinator on the data plane instead, naming the
    non-finite values, and the shared state does not move. (Without it the pass runs:
    the tests above make it find payloads bad.)"""
    from diloco.transports.grpc import client as client_module

    with round_of_one(tmp_path) as (running, island, before):
        checks: list[int] = []
        monkeypatch.setattr(client_module, "decodes_finite", lambda *a: checks.append(1) or True)
        payload = nan_payload(running.codec)
        with pytest.raises(PayloadRefusedError, match="non-finite"):
            island.average_into(payload, 10.0, 0, before, None, checked_finite=True)
        assert checks == []
        assert running.coordinator.state_sha256() == before
        assert running.coordinator.stats.refused_payloads == 1


def raw_average(coordinator: Running, header_bytes: int, body: bytes) -> grpc.RpcError:
    """An Average call that announces `header_bytes` and sends `body`; returns its error."""
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(coordinator.settings.address))
    header = pb.AverageHeader(
        run_id="run",
        rank=0,
        round=0,
        weight=1.0,
        params_sha256=coordinator.coordinator.state_sha256(),
        payload_bytes=header_bytes,
    )

    def requests() -> Iterator[pb.Chunk]:
        yield pb.Chunk(average=header)
        yield pb.Chunk(data=body)

    with pytest.raises(grpc.RpcError) as error:
        list(stub.Average(requests(), metadata=coordinator.metadata(0), timeout=20))
    return error.value


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("announced", "sent", "fragment"),
    [
        ("full", "half", "truncated"),
        ("short", "short", "announces"),
        ("full", "garbage", "magic"),
    ],
)
def test_malformed_payloads_are_refused(
    coordinator: Running, announced: str, sent: str, fragment: str
) -> None:
    seeded(coordinator)
    before = coordinator.coordinator.state_sha256()
    payload = coordinator.codec.encode(delta(0)).numpy().tobytes()
    sizes = {"full": len(payload), "short": len(payload) - 4}
    bodies = {
        "half": payload[: len(payload) // 2],
        "short": payload[:-4],
        "garbage": bytes(len(payload)),
    }
    error = raw_average(coordinator, sizes[announced], bodies[sent])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.details(), error.details()
    assert coordinator.coordinator.state_sha256() == before
    assert coordinator.coordinator.stats.refused_payloads == 1


@pytest.mark.timeout(60)
def test_payload_of_another_codec_is_refused(coordinator: Running) -> None:
    island = seeded(coordinator)
    before = coordinator.coordinator.state_sha256()
    int8_payload = build_codec("int8").encode(delta(0))
    with pytest.raises(PayloadRefusedError, match="announces"):
        island.average(int8_payload, 1.0, 0, before)
    assert coordinator.coordinator.state_sha256() == before


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[str, str]:
    cert, key = self_signed_pair(tmp_path)
    return str(cert), str(key)


@pytest.mark.timeout(60)
def test_mutual_tls_refuses_an_island_without_a_certificate(
    tmp_path: Path, tls_pair: tuple[str, str]
) -> None:
    cert, key = tls_pair
    listen = GrpcTransportConfig(address="127.0.0.1:0", tls_cert=cert, tls_key=key, mutual_tls=True)
    rules = RoundRules(run_id="run", rounds=2, islands=1, min_islands=1)
    coordinator = Coordinator(rules, build_codec("none"), SGD, pinned={}, state_dir=None)
    server = CoordinatorServer(coordinator, listen, TOKEN).start()
    address = f"127.0.0.1:{server.port}"
    served = dataclasses.replace(listen, address=address)
    try:
        with_cert = GrpcTransport(
            served, run_id="run", token=TOKEN, codec=build_codec("none"), numel=NUMEL, rank=0,
            num_islands=1,
        )  # fmt: skip
        with_cert.join([], FINGERPRINT)  # the island presents tls_cert / tls_key: accepted
        with_cert.close()

        # An island that trusts the coordinator but presents no certificate of its own.
        channel = grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes()),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        stub = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Join(
                pb.JoinRequest(run_id="run", rank=0, fingerprint=FINGERPRINT),
                metadata=token_metadata(TOKEN),
                timeout=10,
            )
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        server.stop(0)


def test_plaintext_is_refused_unless_asked_for() -> None:
    with pytest.raises(ConfigError, match="needs TLS"):
        GrpcTransport(
            GrpcTransportConfig(), run_id="run", token=TOKEN, codec=build_codec("none"),
            numel=NUMEL, rank=0, num_islands=1,
        )  # fmt: skip
