"""A grpc coordinator's status, end to end in one process: `start_coordinator` with
`transport.grpc.status_listen` on port 0, islands as threads, and the status read three ways:
`GET /status.json`, the grpc `Status` call (`diloco-island status`'s fetcher) and the table.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from harness import run_threads

from diloco.codecs import build_codec
from diloco.config import IslandConfig, load_config
from diloco.errors import ConfigError
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.status import IslandState, RunUnreachable, StatusSnapshot, StatusUnavailable
from diloco.transports.base import TransportSetup
from diloco.transports.config import TransportConfig, TransportKind
from diloco.transports.grpc import GrpcTransport
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.hosting import start_coordinator
from diloco.transports.grpc.service import CoordinatorServer
from islands.status import run_status
from islands.status_fetch import fetch_coordinator

pytestmark = pytest.mark.timeout(60)

NUMEL = 1000
ROUNDS = 2
TOKEN = "status-coordinator-token-0123456789"
TOKEN_ENV = "DILOCO_STATUS_TEST_TOKEN"
GROUP_SETTINGS = {"outer.rounds": str(ROUNDS), "outer.codec, block_size": "none, 256"}
FINGERPRINT = {"model": "m1", **GROUP_SETTINGS}
CODEC = build_codec("none")
SGD = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


class Hosted:
    """A coordinator started as `diloco-island` starts one, and its islands' settings."""

    def __init__(self, run_dir: Path, status_listen: str = "127.0.0.1:0"):
        self.run_dir = run_dir
        self.announced: list[str] = []
        grpc = GrpcTransportConfig(
            address="127.0.0.1:0", insecure=True, retry_s=5, status_listen=status_listen
        )
        setup = TransportSetup(
            config=TransportConfig(kind=TransportKind.grpc, islands=2, run_id="run", grpc=grpc),
            codec=CODEC,
            numel=0,
            ranks=[],
            rounds=ROUNDS,
            optimizer=SGD,
            group_settings=GROUP_SETTINGS,
            run_dir=run_dir,
            device=torch.device("cpu"),
            announce=self.announced.append,
        )
        self.server: CoordinatorServer = start_coordinator(setup, TOKEN)
        self.settings = GrpcTransportConfig(
            address=f"127.0.0.1:{self.server.port}", insecure=True, retry_s=5
        )

    @property
    def address_file(self) -> Path:
        return self.run_dir / "coordinator" / "status-address"

    def page_port(self) -> int:
        return int(self.address_file.read_text().strip().rpartition(":")[2])

    def island(self, rank: int, lane: str = "") -> GrpcTransport:
        return GrpcTransport(
            self.settings,
            run_id="run",
            token=TOKEN,
            codec=CODEC,
            numel=NUMEL,
            rank=rank,
            num_islands=2,
            session_file=self.run_dir / f"island-{rank}" / f"grpc-session{lane}",
            lane=lane,
        )

    def island_config(self, token_env: str = TOKEN_ENV) -> IslandConfig:
        return load_config(
            None,
            [
                "transport.kind=grpc",
                "transport.islands=2",
                "transport.rank=0",
                f"transport.grpc.address=127.0.0.1:{self.server.port}",
                "transport.grpc.insecure=true",
                f"transport.grpc.token_env={token_env}",
                f"run.dir={self.run_dir}",
            ],
        )


@pytest.fixture
def hosted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hosted]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    running = Hosted(tmp_path / "run")
    yield running
    running.server.stop(0)


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=b"{}" if method != "GET" else None)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def play(hosted: Hosted, lanes: tuple[str, ...] = ("",)) -> list[str]:
    """Two islands average ROUNDS rounds in every lane, sending rows as islands/loop.py does;
    returns the hash after each round of the first lane."""
    anchor = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    initial = SharedState(0, anchor, {"momentum": torch.zeros(NUMEL)})

    def island(rank: int) -> list[str]:
        transports = [hosted.island(rank, lane) for lane in lanes]
        hashes = []
        for transport in transports:
            transport.join([], FINGERPRINT)
            transport.shared_state(initial)
        state = initial.copy()
        for round in range(ROUNDS):
            sha = params_sha256(state.anchor)
            for transport in transports:
                delta = torch.full((NUMEL,), 0.01 * (rank + 1))
                result = transport.average(CODEC.encode(delta), 100.0, round, sha)
            SGD.step_(state.anchor, result.mean, state.outer_state, round)
            hashes.append(params_sha256(state.anchor))
            row = {"round": round + 1, "tokens": 640 * (round + 1), "train_loss": 3.0 - rank}
            for transport in transports:
                transport.note_metrics(row)
        for transport in transports:
            transport.close()
        return hashes

    first, second = run_threads(island, [(0,), (1,)], timeout_s=40)
    assert first == second
    for _, coordinator in hosted.server.lanes.items():
        coordinator.flush()
    return list(first)


def test_the_page_the_json_and_the_status_call_follow_the_rounds(hosted: Hosted) -> None:
    port = hosted.page_port()
    assert hosted.announced == [f"the run's status page: http://127.0.0.1:{port}/"]
    status, _, body = get(port, "/status.json")
    assert status == 200
    before = StatusSnapshot.from_json(body)
    assert (before.round, before.transport, before.run_id) == (0, "grpc", "run")
    assert [i.state for i in before.islands] == [IslandState.never_joined] * 2
    assert before.outer_settings["outer.block_size"] == "256"

    hashes = play(hosted)
    snapshot = StatusSnapshot.from_json(fetch_coordinator(hosted.island_config()).to_json())
    assert (snapshot.round, snapshot.params_sha256, snapshot.finished) == (2, hashes[-1], True)
    assert [r.params_sha256 for r in snapshot.rounds] == hashes
    payload = CODEC.payload_bytes(NUMEL)
    for island in snapshot.islands:
        assert island.state is IslandState.left
        assert (island.bytes_sent, island.bytes_received) == (2 * payload, 2 * payload)
        # Round 1's row came with round 2's payload; the last row is never sent.
        assert (island.tokens, island.train_loss) == (640, 3.0 - island.rank)
    assert snapshot.rounds[0].tokens == 1280 and snapshot.rounds[0].train_loss == 2.5

    code, table = run_status(
        hosted.island_config(), fetch_coordinator=fetch_coordinator, fetch_hivemind=None
    )
    assert code == 0 and "diloco run 'run' · grpc · round 2 · finished" in table


def test_the_status_is_read_only_and_never_shows_the_token(hosted: Hosted) -> None:
    play(hosted)
    port = hosted.page_port()
    before = get(port, "/status.json")[2]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, body = get(port, "/status.json", method)
        assert (status, headers["Allow"]) == (405, "GET, HEAD")
    assert get(port, "/status.json")[2] == before  # cached or rebuilt: the same run
    for path in ("/", "/status.json"):
        status, headers, body = get(port, path)
        assert status == 200
        assert TOKEN not in body.decode() and TOKEN not in str(headers)
    assert not any(TOKEN in line for line in hosted.announced)


def test_a_wrong_token_and_a_silent_address_are_one_line_each(
    hosted: Hosted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WRONG_TOKEN", "another-token-0123456789abcdef")
    with pytest.raises(StatusUnavailable, match="refused the run token") as refused:
        fetch_coordinator(hosted.island_config(token_env="WRONG_TOKEN"))
    assert not isinstance(refused.value, RunUnreachable)
    code, line = run_status(
        hosted.island_config(token_env="WRONG_TOKEN"),
        fetch_coordinator=fetch_coordinator,
        fetch_hivemind=None,
    )
    assert code == 1 and "\n" not in line and "refused the run token" in line
    figures = StatusSnapshot.from_json(get(hosted.page_port(), "/status.json")[2]).coordinator
    assert figures is not None and figures.refused_calls >= 2

    hosted.server.stop(0)
    with pytest.raises(RunUnreachable, match="unreachable"):
        fetch_coordinator(hosted.island_config())


def test_the_page_stops_with_the_coordinator(hosted: Hosted) -> None:
    port = hosted.page_port()
    hosted.server.stop(0)
    assert not hosted.address_file.exists()
    with pytest.raises(OSError):
        get(port, "/status.json")


def test_lanes_feed_one_status_with_bytes_per_fragment(hosted: Hosted) -> None:
    hashes = play(hosted, lanes=("fragment-0", "fragment-1"))
    snapshot = fetch_coordinator(hosted.island_config())
    payload = CODEC.payload_bytes(NUMEL)
    assert snapshot.round == 2 and [r.params_sha256 for r in snapshot.rounds] == hashes
    for island in snapshot.islands:
        assert island.bytes_sent == 4 * payload
        assert [(f.fragment, f.bytes_sent) for f in island.per_fragment] == [
            (0, 2 * payload),
            (1, 2 * payload),
        ]


def test_a_public_page_needs_the_token(tmp_path: Path) -> None:
    hosted = Hosted(tmp_path / "run", status_listen="0.0.0.0:0")
    try:
        port = hosted.page_port()
        assert get(port, "/status.json")[0] == 401
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/status.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        hosted.server.stop(0)


def test_a_malformed_status_listen_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="transport.grpc.status_listen"):
        GrpcTransportConfig(status_listen="8080")
