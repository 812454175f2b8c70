"""The outer-loop features through the CLI: a warm start loads exactly the weights given, and a
run with a warm phase, momentum warm-up and a cosine outer lr resumes bit-exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import TINY, FaultPlan, assert_ok, metrics_rows, run_cli, start_cli
from safetensors.torch import save_file

from diloco.config import load_config
from diloco.models.build import build_model
from diloco.outer.pseudo_gradient import flatten_params
from diloco.shared_state import params_sha256

pytestmark = pytest.mark.timeout(240)
FEATURES = (
    "outer.warmup_rounds=2",
    "outer.warmup_lr=1.4",
    "outer.momentum_warmup_rounds=2",
    "outer.lr_schedule=cosine",
    "outer.min_lr_ratio=0.2",
)


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "island.yaml"
    path.write_text("transport: {kind: local, islands: 2}\nouter: {inner_steps: 3}\n")
    return str(path)


def initial_weights(run_dir: Path) -> str:
    return str(json.loads((run_dir / "fingerprint.json").read_text())["initial weights"])


# About 20 s: make test-all. test_warm_start_from_a_state_dict_file runs a warm start in make test.
@pytest.mark.slow
def test_warm_start_from_a_checkpoint_starts_from_its_shared_parameters(
    config: str, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert_ok(run_cli(["--config", config, *TINY, "outer.rounds=2", f"run.dir={first}"]))
    final = metrics_rows(first)[-1]["params_sha256"]
    checkpoint = first / "checkpoints" / "round-000002.safetensors"
    result = run_cli(
        [
            "--config",
            config,
            *TINY,
            "outer.rounds=1",
            f"run.dir={second}",
            f"run.init_from={checkpoint}",
        ]
    )
    assert_ok(result)
    assert initial_weights(second) == final[:16]
    assert initial_weights(second) != initial_weights(first)


def test_warm_start_from_a_state_dict_file(config: str, tmp_path: Path) -> None:
    """A safetensors state_dict of the same model (other seed): those exact weights."""
    settings = load_config(None, list(TINY))
    torch.manual_seed(123)
    model = build_model(settings.model, context=settings.data.seq_len)
    weights = tmp_path / "weights.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
        str(weights),
    )
    run_dir = tmp_path / "run"
    assert_ok(
        run_cli(
            [
                "--config",
                config,
                *TINY,
                "outer.rounds=1",
                f"run.dir={run_dir}",
                f"run.init_from={weights}",
            ]
        )
    )
    expected = params_sha256(flatten_params(list(model.parameters())))
    assert initial_weights(run_dir) == expected[:16]


def test_a_warm_start_that_does_not_fit_names_the_key(config: str, tmp_path: Path) -> None:
    weights = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(weights))
    result = run_cli(
        ["--config", config, *TINY, f"run.dir={tmp_path / 'run'}", f"run.init_from={weights}"]
    )
    assert result.returncode == 2, result.describe()
    assert "run.init_from" in result.stderr and "does not fit the model" in result.stderr


# About 30 s: make test-all. Resumes run in make test in tests/e2e/test_streaming_resume.py and
# tests/integration/test_error_feedback_resume.py.
@pytest.mark.slow
def test_the_outer_features_resume_bit_exactly(config: str, tmp_path: Path) -> None:
    """6 rounds (2 warm ones of one step, momentum warm-up, cosine outer lr): killed after
    round 3 and run again, every round's hash is the uninterrupted run's."""
    common = ["--config", config, *TINY, *FEATURES, "outer.rounds=6", "run.checkpoint_every=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(run_cli([*common, f"run.dir={straight}"], timeout_s=150))
    rows = metrics_rows(straight)
    assert [row["inner_step"] for row in rows] == [1, 2, 5, 8, 11, 14]  # warm rounds: 1 step
    command = [*common, f"run.dir={killed}"]
    (first,) = FaultPlan().kill(island=0, round=3).run([start_cli(command)], [killed], 120)
    assert first.returncode == -9, first.describe()
    assert_ok(run_cli(command, timeout_s=150))
    assert [r["params_sha256"] for r in metrics_rows(killed)] == [r["params_sha256"] for r in rows]
