"""outer.optimizer through the CLI: adam and a module:factory train on the local, torch and grpc
transports with the same anchor on every island (and on the coordinator), and a killed run
resumes to the uninterrupted run's parameters, bit for bit."""

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

# make test-all: adam and module:factory through the CLI on every
# transport (the conformance suite checks an injected Adam in make test).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "examples" / "plugins"
TOKEN = "e2e-outer-token-0123456789abcdef"
SHORT = ("outer.inner_steps=3", "inner.warmup_steps=2", "eval.every=0", "run.checkpoint_every=1")
OPTIMIZERS = {
    "adam": ("outer.optimizer=adam", "outer.lr=0.02", "outer.betas=[0.8,0.99]"),
    "factory": (
        "outer.optimizer=outer_sgd:build",
        "outer.optimizer_args={lr: 0.5, momentum: 0.8}",
    ),
}


@pytest.fixture
def config(tmp_path: Path) -> str:
    """A config file for the runs (the settings come as overrides)."""
    path = tmp_path / "island.yaml"
    path.write_text("run: {seed: 0}\n")
    return str(path)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_local_islands_resume_bit_exactly(optimizer: str, config: str, tmp_path: Path) -> None:
    """2 local islands, 5 rounds: a run killed after round 2 and run again ends, round by
    round, on the uninterrupted run's params_sha256; the optimizer's state is in the
    checkpoint (the resumed rounds would differ without it)."""
    common = [*TINY, *SHORT, *OPTIMIZERS[optimizer], "transport.islands=2", "outer.rounds=5"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(run_cli(["--config", config, *common, f"run.dir={straight}"], cwd=PLUGINS))
    command = ["--config", config, *common, f"run.dir={killed}"]
    (first,) = (
        FaultPlan()
        .kill(island=0, round=2)
        .run([start_cli(command, cwd=PLUGINS)], [killed], timeout_s=120)
    )
    assert first.returncode == -9, first.describe()
    assert 2 <= len(metrics_rows(killed)) < 5
    assert_ok(run_cli(command, cwd=PLUGINS, timeout_s=120))
    assert params_hashes(killed) == params_hashes(straight)
    assert len(set(params_hashes(straight))) == 5  # the anchor moved every round


@pytest.mark.timeout(240)
def test_torch_islands_hold_the_same_anchor(config: str, tmp_path: Path) -> None:
    """2 torch-transport processes with outer.optimizer=adam: the same hash every round."""
    port = free_port()
    common = [
        *TINY,
        *SHORT,
        *OPTIMIZERS["adam"],
        "transport.kind=torch",
        "transport.islands=2",
        "outer.rounds=3",
        f"transport.torch.init_method=tcp://127.0.0.1:{port}",
        f"run.dir={tmp_path}",
    ]
    processes = [
        start_cli(["--config", config, *common, f"transport.rank={rank}"]) for rank in (0, 1)
    ]
    assert_ok(*finish_all(processes, timeout_s=150))
    first, second = (params_hashes(tmp_path / f"island-{rank}") for rank in (0, 1))
    assert len(first) == 3 and first == second


@pytest.mark.timeout(300)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_grpc_islands_and_coordinator_hold_the_same_anchor(
    optimizer: str, config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standalone coordinator and 2 islands: every island's hash equals the others' every
    round, and the coordinator's final state (stepped by its injected optimizer) is theirs."""
    monkeypatch.setenv("DILOCO_TOKEN", TOKEN)
    common = [
        *TINY,
        *SHORT,
        *OPTIMIZERS[optimizer],
        "transport.kind=grpc",
        "transport.islands=2",
        "transport.min_islands=2",
        "outer.rounds=3",
        "transport.grpc.insecure=true",
        f"transport.grpc.address=127.0.0.1:{free_port()}",
        "transport.grpc.linger_s=10",
        f"run.dir={tmp_path}",
    ]
    coordinator = start_cli(
        ["--config", config, *common, "transport.grpc.role=coordinator"], cwd=PLUGINS
    )
    islands = [
        start_cli(["--config", config, *common, f"transport.rank={rank}"], cwd=PLUGINS)
        for rank in (0, 1)
    ]
    results = finish_all([*islands, coordinator], timeout_s=240)
    assert_ok(*results)
    first, second = (params_hashes(tmp_path / f"island-{rank}") for rank in (0, 1))
    assert len(first) == 3 and first == second
    summary = json.loads((tmp_path / "coordinator" / "summary.json").read_text())
    assert summary["params_sha256"] == first[-1]
