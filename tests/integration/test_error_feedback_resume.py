"""Error feedback through the real runtime: each local island's residual is its own, and a
resumed run continues with every island's residual, ending where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import torch
from harness import TINY

from diloco.checkpoint import checkpoint_path, load_checkpoint
from diloco.config import load_config
from diloco.metrics import read_metrics
from islands.island import run_island

SETTINGS = [
    *TINY,
    "transport.kind=local",
    "transport.islands=2",
    "outer.rounds=4",
    "outer.inner_steps=2",
    "outer.codec=topk",
    "outer.topk_fraction=0.05",
    "outer.error_feedback=true",
    "inner.warmup_steps=1",
    "run.checkpoint_every=1",
    "run.keep_checkpoints=4",
]


def test_resume_restores_every_islands_residual(tmp_path: Path) -> None:
    straight = run_island(load_config(None, [*SETTINGS, f"run.dir={tmp_path / 'straight'}"]))
    checkpoints = tmp_path / "straight" / "checkpoints"
    state = load_checkpoint(checkpoints, 2)
    residuals = [island["residual"] for island in state["islands"]]
    assert [island["rank"] for island in state["islands"]] == [0, 1]
    assert not torch.equal(residuals[0], residuals[1]), "the islands share one residual"
    assert residuals[0].abs().sum() > 0

    # Replay rounds 3 and 4 from round 2's checkpoint.
    for round in (3, 4):
        checkpoint_path(checkpoints, round).unlink()
    resumed = run_island(
        load_config(None, [*SETTINGS, f"run.dir={tmp_path / 'straight'}", "run.resume=true"])
    )
    rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert resumed["params_sha256"] == straight["params_sha256"]
