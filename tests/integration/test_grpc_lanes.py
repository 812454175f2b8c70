"""Lanes on a real grpc coordinator (loopback): islands of several exchange groups, one lane each,
averaging apart; the lane bound; malformed lane names refused before anything is allocated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from harness import run_threads

from diloco.aggregate import weighted_mean
from diloco.codecs import build_codec
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.base import GroupMismatchError
from diloco.transports.grpc import Coordinator, CoordinatorServer, GrpcTransport, RoundRules
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.hosting import summary
from diloco.transports.grpc.lanes import lane_fingerprint
from diloco.transports.grpc.security import LANE_METADATA_KEY, token_metadata

pytestmark = pytest.mark.timeout(60)

TOKEN = "lanes-token-0123456789abcdef"
FINGERPRINT = {"model": "m1", "parameters": "1000", "initial weights": "0123456789abcdef"}
SIZES = {"fragment-0": 600, "fragment-1": 400}
SGD = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


class Running:
    def __init__(self, tmp_path: Path, max_lanes: int):
        self.tmp_path = tmp_path
        self.codec = build_codec("none")
        rules = RoundRules(run_id="run", rounds=5, islands=2, min_islands=2)
        self.coordinator = Coordinator(
            rules, self.codec, SGD, pinned=FINGERPRINT, state_dir=tmp_path / "coordinator"
        )
        listen = GrpcTransportConfig(address="127.0.0.1:0", insecure=True, max_lanes=max_lanes)
        self.server = CoordinatorServer(self.coordinator, listen, TOKEN).start()
        self.address = f"127.0.0.1:{self.server.port}"

    def client(self, rank: int, lane: str) -> GrpcTransport:
        settings = GrpcTransportConfig(address=self.address, insecure=True, retry_s=5)
        return GrpcTransport(
            settings,
            run_id="run",
            token=TOKEN,
            codec=self.codec,
            numel=SIZES[lane],
            rank=rank,
            num_islands=2,
            session_file=self.tmp_path / f"island-{rank}" / f"grpc-session-{lane}",
            lane=lane,
        )


@pytest.fixture
def make(tmp_path: Path) -> Iterator[type[Running]]:
    made: list[Running] = []

    def start(max_lanes: int = 4) -> Running:
        running = Running(tmp_path, max_lanes)
        made.append(running)
        return running

    yield start  # type: ignore[misc]
    for running in made:
        running.server.stop(0)


def initial(lane: str) -> SharedState:
    numel = SIZES[lane]
    anchor = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    return SharedState(0, anchor, {"momentum": torch.zeros(numel)})


def delta(rank: int, lane: str) -> torch.Tensor:
    numel = SIZES[lane]
    return torch.randn(numel, generator=torch.Generator().manual_seed(10 * rank + numel))


def test_each_lane_averages_its_own_slice_with_its_own_state(
    make: type[Running], tmp_path: Path
) -> None:
    running = make()

    def island(rank: int) -> dict[str, tuple[bytes, int]]:
        answers = {}
        for lane in SIZES:  # one island's lanes, one after the other
            transport = running.client(rank, lane)
            transport.join([], FINGERPRINT)
            transport.shared_state(initial(lane))
            sha = params_sha256(initial(lane).anchor)
            payload = running.codec.encode(delta(rank, lane))
            result = transport.average(payload, 100.0 + rank, 0, sha)
            answers[lane] = (result.mean.numpy().tobytes(), result.participants)
            transport.close()
        return answers

    results = run_threads(island, [(0,), (1,)], timeout_s=40)
    for lane in SIZES:
        expected = weighted_mean([delta(0, lane), delta(1, lane)], [100.0, 101.0])
        for answers in results:
            mean_bytes, participants = answers[lane]
            assert participants == 2
            assert torch.equal(
                torch.frombuffer(bytearray(mean_bytes), dtype=torch.float32), expected
            )
    lanes = running.server.lanes
    assert not running.coordinator.has_state()  # the main lane was never used
    figures = summary(running.server, 2)["lanes"]
    assert isinstance(figures, dict) and sorted(figures) == sorted(SIZES)
    for lane, numel in SIZES.items():
        coordinator = lanes.get(lane)
        assert coordinator is not None and coordinator.numel == numel
        assert figures[lane]["round"] == 1 and figures[lane]["participants_per_round"] == [2]
        assert figures[lane]["params_sha256"] == coordinator.state_sha256()
        assert (tmp_path / "coordinator" / "lanes" / lane).is_dir()
        for rank in (0, 1):
            assert (tmp_path / f"island-{rank}" / f"grpc-session-{lane}").is_file()


def test_a_join_past_max_lanes_is_refused_and_counted(make: type[Running]) -> None:
    running = make(max_lanes=1)
    first = running.client(0, "fragment-0")
    first.join([], FINGERPRINT)
    second = running.client(0, "fragment-1")
    with pytest.raises(GroupMismatchError, match=r"max_lanes=1 lanes besides the main one"):
        second.join([], FINGERPRINT)
    assert running.server.lanes.refused == 1
    assert running.server.service.refused_calls == 1
    assert running.server.lanes.get("fragment-1") is None
    first.close()


@pytest.mark.parametrize("lane", ["Fragment-0", "../escape", "a" * 65, "frag ment"])
def test_a_malformed_lane_is_refused_before_anything_is_allocated(
    make: type[Running], tmp_path: Path, lane: str
) -> None:
    running = make()
    stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(running.address))
    request = pb.JoinRequest(
        run_id="run", rank=0, fingerprint=lane_fingerprint(FINGERPRINT, 10), host="h"
    )
    metadata = (*token_metadata(TOKEN), (LANE_METADATA_KEY, lane))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Join(request, metadata=metadata, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a lane name" in (raised.value.details() or "")
    assert [name for name, _ in running.server.lanes.items()] == [""]
    assert not (tmp_path / "coordinator" / "lanes").exists()
    assert running.server.lanes.refused == 1 and running.server.service.refused_calls == 1
