"""Streaming DiLoCo through the CLI: a run killed mid-stream and run again ends, round by round,
on the uninterrupted run's hashes (exchanges in flight at a checkpoint are saved with it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import TINY, FaultPlan, assert_ok, metrics_rows, run_cli, start_cli

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize(
    "stream",
    [
        # the in-flight case below covers this one's path too: make test-all runs it
        pytest.param(("outer.fragments=3", "outer.overlap_steps=2"), marks=pytest.mark.slow),
        # tau beyond the first fragment's offset: an exchange is in flight at every round's end
        ("outer.fragments=2", "outer.overlap_steps=5", "outer.eager=true"),
    ],
    ids=["overlap", "in-flight-at-checkpoint"],
)
def test_a_killed_streaming_run_resumes_bit_exactly(
    stream: tuple[str, ...], tmp_path: Path
) -> None:
    config = tmp_path / "island.yaml"
    config.write_text("transport: {kind: local, islands: 2}\nouter: {inner_steps: 6}\n")
    common = ["--config", str(config), *TINY, *stream, "outer.rounds=5", "run.checkpoint_every=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert_ok(run_cli([*common, f"run.dir={straight}"], timeout_s=150))
    command = [*common, f"run.dir={killed}"]
    (first,) = FaultPlan().kill(island=0, round=2).run([start_cli(command)], [killed], 120)
    assert first.returncode == -9, first.describe()
    assert 2 <= len(metrics_rows(killed)) < 5
    assert_ok(run_cli(command, timeout_s=150))
    expected = [row["params_sha256"] for row in metrics_rows(straight)]
    assert [row["params_sha256"] for row in metrics_rows(killed)] == expected
    assert len(set(expected)) == 5
