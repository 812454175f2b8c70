"""Streaming DiLoCo on the grpc transport: one coordinator lane per fragment.

A standalone coordinator and two `diloco-island` processes on loopback (TLS and the run token
on), P = 2 fragments, tau = 1: every island ends every round on the local transport's hashes,
the coordinator reports each lane; a killed island, restarted, rejoins every lane.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from harness import (
    TINY,
    assert_ok,
    finish,
    finish_all,
    free_port,
    metrics_rows,
    run_cli,
    self_signed_pair,
    start_cli,
)

TOKEN = "e2e-stream-token-0123456789"
STREAM = (
    "outer.fragments=2",
    "outer.overlap_steps=1",
    "outer.mix=0.5",
    "outer.inner_steps=6",
    "transport.islands=2",
)
LANES = ["fragment-0", "fragment-1"]


@pytest.fixture(autouse=True)
def run_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DILOCO_TOKEN", TOKEN)


def local_hashes(tmp_path: Path, rounds: int) -> list[str]:
    config = tmp_path / "local.yaml"
    config.write_text("run: {seed: 0}\n")
    run_dir = tmp_path / "local"
    args = ["--config", str(config), *TINY, *STREAM, f"outer.rounds={rounds}", f"run.dir={run_dir}"]
    assert_ok(run_cli(args, 150))
    return [row["params_sha256"] for row in metrics_rows(run_dir)]


class Group:
    def __init__(self, tmp_path: Path, rounds: int, *extra: str):
        cert, key = self_signed_pair(tmp_path)
        self.run_dir = tmp_path / "run"
        (tmp_path / "island.yaml").write_text(f"run:\n  dir: {self.run_dir}\n  seed: 0\n")
        self.common = [
            "--config",
            str(tmp_path / "island.yaml"),
            *TINY,
            *STREAM,
            f"outer.rounds={rounds}",
            "transport.kind=grpc",
            "transport.min_islands=2",
            f"transport.grpc.address=127.0.0.1:{free_port()}",
            f"transport.grpc.tls_cert={cert}",
            f"transport.grpc.tls_key={key}",
            "transport.grpc.deadline_floor_s=2",
            "transport.grpc.retry_s=60",
            "transport.grpc.linger_s=3",
            *extra,
        ]

    def coordinator(self) -> subprocess.Popen[str]:
        return start_cli([*self.common, "transport.grpc.role=coordinator"])

    def island(self, rank: int) -> subprocess.Popen[str]:
        return start_cli([*self.common, f"transport.rank={rank}"])

    def hashes(self, rank: int) -> dict[int, str]:
        rows = metrics_rows(self.run_dir / f"island-{rank}")
        return {row["round"]: row["params_sha256"] for row in rows}

    def summary(self) -> dict[str, object]:
        return json.loads((self.run_dir / "coordinator" / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_islands_stream_on_grpc_to_the_local_hashes(tmp_path: Path) -> None:
    rounds = 3
    group = Group(tmp_path, rounds)
    coordinator = group.coordinator()
    islands = [group.island(rank) for rank in range(2)]
    assert_ok(*finish_all(islands, 150))
    assert_ok(finish(coordinator, 60))
    hashes = [group.hashes(rank) for rank in range(2)]
    reference = local_hashes(tmp_path, rounds)
    assert [hashes[0][r] for r in range(1, rounds + 1)] == reference
    assert hashes[0] == hashes[1]
    summary = group.summary()
    lanes = summary["lanes"]
    assert isinstance(lanes, dict) and sorted(lanes) == LANES
    for lane in LANES:
        assert lanes[lane]["round"] == rounds
        assert lanes[lane]["participants_per_round"] == [2] * rounds
        assert (group.run_dir / "coordinator" / "lanes" / lane).is_dir()
        for rank in range(2):
            assert (group.run_dir / f"island-{rank}" / f"grpc-session-{lane}").is_file()
    assert summary["refused_payloads"] == 0


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_killed_streaming_island_restarts_and_rejoins_every_lane(tmp_path: Path) -> None:
    """SIGKILL island 1 once it has saved its checkpoint of round 2; with min_islands = 2 the
    other waits in its next exchange. Restarted, island 1 resumes its newest checkpoint, joins
    every lane again with its saved sessions, and sends again the exchanges it had sent since
    (each lane is at most one exchange ahead of a checkpoint: a lane's round closes before
    the island's next checkpoint, not after): they are answered with the means the group
    used, so both islands end every round on the uninterrupted run's hashes."""
    rounds = 8
    group = Group(tmp_path, rounds, "run.checkpoint_every=1", "outer.inner_steps=30")
    coordinator = group.coordinator()
    survivor = group.island(0)
    victim = group.island(1)
    saved = group.run_dir / "island-1" / "checkpoints" / "round-000002.safetensors"
    deadline = time.monotonic() + 120
    while not saved.is_file():
        assert time.monotonic() < deadline and victim.poll() is None, "no checkpoint of round 2"
        time.sleep(0.01)
    victim.kill()
    victim.wait(timeout=10)
    restarted = group.island(1)
    survivor_result, restarted_result = finish_all([survivor, restarted], 300)
    assert_ok(survivor_result, restarted_result, finish(coordinator, 60))
    hashes = [group.hashes(rank) for rank in range(2)]
    assert sorted(hashes[0]) == list(range(1, rounds + 1)), survivor_result.describe()
    assert hashes[1] == hashes[0], restarted_result.describe()
    lanes = group.summary()["lanes"]
    assert isinstance(lanes, dict)
    for lane in LANES:
        assert lanes[lane]["round"] == rounds
        assert lanes[lane]["participants_per_round"] == [2] * rounds
