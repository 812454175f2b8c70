"""examples/regime.py: a tiny map resumes point by point and writes a consistent table, JSON
and heatmap (each row against the best-lr DDP-equivalent, its bytes against DDP's)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from harness import TINY

from diloco.codecs import build_codec
from diloco.transports import ring_allreduce_bytes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "regime.py"
STEPS = 4
GRID = ["--windows", "2", "--steps", str(STEPS), "--inner-steps", "2", "--islands", "2"]
GRID += ["--outer", "paper", "tuned", "--lr-scale", "1", "2"]
POINTS = 2 * (1 + 2 + 1)  # lr scales x (DDP-equivalent, two outer, one alone)


def regime_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regime_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    return module


def run_map(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(EXAMPLE), *GRID, "--eval-windows", "4", *extra]
    command += ["--out", str(out), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def point_files(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/point.json")}


@pytest.mark.slow  # about 60 s on 2 loaded cores: 8 tiny runs, each a fresh process
@pytest.mark.timeout(420)
def test_a_stopped_map_resumes_and_tabulates_every_cell(tmp_path: Path) -> None:
    run_map(tmp_path, "--limit", "3")
    first = point_files(tmp_path)
    assert len(first) == 3
    partial = json.loads((tmp_path / "regime.json").read_text())
    assert sorted(partial["points"]) == sorted(first)

    done = run_map(tmp_path)
    assert f"{POINTS} of {POINTS} points done" in done.stdout
    after = point_files(tmp_path)
    assert len(after) == POINTS
    assert {name: after[name] for name in first} == first  # finished points are not rerun

    document = json.loads((tmp_path / "regime.json").read_text())
    points, rows = document["points"], document["rows"]
    assert len(rows) == 2  # one per outer setting (windows 2, k = 2, H = 2)
    numel = points["b2-alone-lr1"]["shared_parameters"]
    payload = build_codec("none").payload_bytes(numel)
    for row in rows:
        b = row["windows"]
        ddp = min(points[f"b{b}-ddp2-lr{s}"]["val_loss"] for s in (1, 2))
        alone = min(points[f"b{b}-alone-lr{s}"]["val_loss"] for s in (1, 2))
        runs = [points[f"b{b}-k2-h2-{row['outer']}-lr{s}"]["val_loss"] for s in (1, 2)]
        assert row["val_loss"] == min(runs) and row["ddp_val_loss"] == ddp
        assert row["gap"] == pytest.approx(row["val_loss"] / ddp - 1, abs=1e-5)
        assert row["share_of_ddp_gain"] == pytest.approx(
            (alone - row["val_loss"]) / (alone - ddp), abs=1e-4
        )
        assert row["tokens_per_step"] == b * 16  # TINY's data.seq_len
        point = points[row["run"]]
        assert point["tokens_all_islands"] == 2 * b * 16 * STEPS  # equal tokens with DDP
        assert point["inner_steps"] == STEPS
        assert row["bytes_sent"] == point["rounds"] * ring_allreduce_bytes(payload, 2)
        assert row["ddp_bytes"] == STEPS * ring_allreduce_bytes(4 * numel, 2)
    # tuned: two warm rounds of one step (a quarter of 4, rounded so H = 2 divides the rest),
    # then one round of H = 2.
    assert {r["outer"]: points[r["run"]]["rounds"] for r in rows} == {"paper": 2, "tuned": 3}
    # Every point evaluates the same 4 windows: 1 batch of 2 x 2 for the DDP-equivalent.
    assert "eval.batches=1" in points["b2-ddp2-lr2"]["overrides"]
    assert "eval.batches=2" in points["b2-k2-h2-paper-lr1"]["overrides"]
    table = (tmp_path / "regime.md").read_text()
    assert table.count("\n") == 2 + len(rows)
    assert 0 < (tmp_path / "regime.png").stat().st_size < 200_000


def test_warm_rounds_end_the_main_rounds_on_the_step_budget() -> None:
    warm_rounds = regime_module().warm_rounds
    for steps, h, share in [(400, 50, 0.25), (200, 10, 0.25), (100, 50, 0.25), (4, 2, 0.25)]:
        warm = warm_rounds(steps, h, share)
        assert warm >= share * steps and (steps - warm) % h == 0
        assert warm - h < share * steps  # the smallest such warm phase
    assert warm_rounds(400, 50, 0.25) == 100 and warm_rounds(100, 50, 0.25) == 50


def test_steps_per_batch_size_come_from_one_count_or_per_windows() -> None:
    steps_per_windows = regime_module().steps_per_windows
    assert steps_per_windows(["200"], [8, 64]) == {8: 200, 64: 200}
    assert steps_per_windows(["200", "64:100"], [8, 64]) == {8: 200, 64: 100}
    with pytest.raises(SystemExit, match=r"no step count for \[64\]"):
        steps_per_windows(["8:400"], [8, 64])


def test_diloco_lr_grid_can_be_narrower_than_the_baselines() -> None:
    module = regime_module()
    args = module.parse([*GRID, "--diloco-lr-scale", "1", "--eval-windows", "8"])
    points = module.grid(args, 1e-3)
    kinds = sorted((p.kind, p.lr_scale) for p in points)
    assert kinds == sorted(
        [("ddp", 1.0), ("ddp", 2.0), ("alone", 1.0), ("alone", 2.0)]
        + [("diloco", 1.0)] * 2  # two outer settings, lr 1x only
    )
    with pytest.raises(SystemExit, match="--eval-windows 6 is not a multiple of the batch 4"):
        module.grid(module.parse([*GRID, "--eval-windows", "6"]), 1e-3)
