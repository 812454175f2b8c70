"""run.tensorboard=true writes TensorBoard events next to metrics.jsonl, one point per round."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import TINY

from diloco.config import load_config
from islands.island import run_island

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is an optional extra (pip install diloco[tensorboard])",
)


@pytest.mark.timeout(60)
def test_tensorboard_events_follow_the_metrics(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            *TINY,
            f"run.dir={tmp_path}",
            "run.tensorboard=true",
            "outer.rounds=3",
            "outer.inner_steps=2",
            "transport.islands=2",
        ],
    )
    run_island(config)
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    train = events.Scalars("train_loss")
    assert len(train) == 3
    assert [point.step for point in train] == sorted(point.step for point in train)
    assert {"val_loss", "bytes_sent", "sync_s"} <= set(events.Tags()["scalars"])
