"""outer.offload_state through the CLI: the outer momentum in files between outer steps gives the
same parameters, round by round, as in memory, on the local and grpc transports (islands and
coordinator), across a kill and resume; the settings it cannot work with are refused (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import (
    TINY,
    FaultPlan,
    assert_ok,
    finish_all,
    free_port,
    metrics_rows,
    params_hashes,
    run_cli,
    start_cli,
)

TOKEN = "e2e-offload-token-0123456789abcdef"
COMMON = (
    *TINY,
    "transport.islands=2",
    "outer.rounds=4",
    "outer.inner_steps=3",
    "inner.warmup_steps=2",
    "eval.every=0",
    "run.checkpoint_every=1",
)
OFFLOAD = "outer.offload_state=true"


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "island.yaml"
    path.write_text("run: {seed: 0}\n")
    return str(path)


@pytest.mark.timeout(120)
def test_local_islands_with_the_state_on_disk_match_the_state_in_memory(
    config: str, tmp_path: Path
) -> None:
    memory, disk = tmp_path / "memory", tmp_path / "disk"
    assert_ok(run_cli(["--config", config, *COMMON, f"run.dir={memory}"], timeout_s=100))
    assert_ok(run_cli(["--config", config, *COMMON, OFFLOAD, f"run.dir={disk}"], timeout_s=100))
    assert len(params_hashes(memory)) == 4 and params_hashes(disk) == params_hashes(memory)
    for island in (0, 1):
        momentum = disk / "outer-state" / f"island-{island}-rank-0" / "momentum.f32"
        assert momentum.stat().st_size > 0
    assert not (memory / "outer-state").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_run_with_the_state_on_disk_resumes_bit_exactly(
    config: str, tmp_path: Path
) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(run_cli(["--config", config, *COMMON, OFFLOAD, f"run.dir={straight}"]))
    command = ["--config", config, *COMMON, OFFLOAD, f"run.dir={killed}"]
    (first,) = FaultPlan().kill(island=0, round=2).run([start_cli(command)], [killed], 120)
    assert first.returncode == -9, first.describe()
    assert 2 <= len(metrics_rows(killed)) < 4
    assert_ok(run_cli(command, timeout_s=120))
    assert params_hashes(killed) == params_hashes(straight)


@pytest.mark.timeout(240)
def test_grpc_islands_and_coordinator_with_the_state_on_disk_match_local_islands(
    config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standalone coordinator and 2 islands, all keeping the momentum in files: the hashes of
    local islands that keep it in memory, round by round, on every island and the coordinator."""
    assert_ok(run_cli(["--config", config, *COMMON, f"run.dir={tmp_path / 'local'}"]))
    monkeypatch.setenv("DILOCO_TOKEN", TOKEN)
    grpc = [
        *COMMON,
        OFFLOAD,
        "transport.kind=grpc",
        "transport.min_islands=2",
        "transport.grpc.insecure=true",
        f"transport.grpc.address=127.0.0.1:{free_port()}",
        "transport.grpc.linger_s=10",
        f"run.dir={tmp_path / 'grpc'}",
    ]
    coordinator = start_cli(["--config", config, *grpc, "transport.grpc.role=coordinator"])
    islands = [start_cli(["--config", config, *grpc, f"transport.rank={r}"]) for r in (0, 1)]
    assert_ok(*finish_all([*islands, coordinator], timeout_s=200))
    expected = params_hashes(tmp_path / "local")
    for island in (0, 1):
        assert params_hashes(tmp_path / "grpc" / f"island-{island}") == expected
    summary = json.loads((tmp_path / "grpc" / "coordinator" / "summary.json").read_text())
    assert summary["params_sha256"] == expected[-1]
    assert (tmp_path / "grpc" / "coordinator" / "outer-state" / "momentum.f32").is_file()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "override", ["outer.optimizer=adam", "outer.fragments=2", "outer.overlap_steps=1"]
)
def test_settings_the_state_on_disk_cannot_work_with_are_refused(
    override: str, config: str, tmp_path: Path
) -> None:
    result = run_cli(["--config", config, *COMMON, OFFLOAD, override, f"run.dir={tmp_path}"])
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr
    assert "outer.offload_state" in result.stderr, result.describe()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hivemind_islands_with_the_state_on_disk_agree(config: str, tmp_path: Path) -> None:
    """Two hivemind islands keeping the momentum in files: the same hash every round (a peer
    serves its state from another thread; the files are ordinary tensors to it)."""
    pytest.importorskip("hivemind")
    peers = tmp_path / "peers.txt"
    common = [
        "--config",
        config,
        *COMMON,
        OFFLOAD,
        "outer.rounds=3",
        "transport.kind=hivemind",
        "transport.run_id=e2e-offload",
        "transport.hivemind.host_maddrs=[/ip4/127.0.0.1/tcp/0]",
        "transport.hivemind.use_relay=false",
        "transport.hivemind.matchmaking_s=20",
        "transport.hivemind.averaging_timeout_s=90",
        f"run.dir={tmp_path / 'run'}",
    ]
    joins = [
        f"transport.hivemind.address_file={peers}",
        f"transport.hivemind.initial_peers_file={peers}",
    ]
    islands = [start_cli([*common, f"transport.rank={r}", joins[r]]) for r in (0, 1)]
    assert_ok(*finish_all(islands, timeout_s=280))
    first, second = (params_hashes(tmp_path / "run" / f"island-{r}") for r in (0, 1))
    assert len(first) == 3 and first == second
    assert (tmp_path / "run" / "outer-state" / "island-1-rank-0" / "momentum.f32").is_file()
