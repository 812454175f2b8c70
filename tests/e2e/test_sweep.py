"""examples/sweep.py: a tiny grid over H, codec and island count gives one consistent table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import TINY

from diloco.codecs import build_codec
from diloco.transports import ring_allreduce_bytes

# make test-all: a sweep of several runs.
pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sweep.py"
STEPS = 10


@pytest.mark.timeout(240)
def test_tiny_sweep_collects_one_consistent_table(tmp_path: Path) -> None:
    grid = ["--islands", "2", "3", "--inner-steps", "5", "10", "--codec", "none", "int8"]
    command = [sys.executable, str(EXAMPLE), *grid, "--steps", str(STEPS), "--baselines"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "--out", str(tmp_path), *TINY],
        capture_output=True,
        text=True,
        timeout=220,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    diloco = [r for r in rows if r["kind"] == "diloco"]
    assert len(diloco) == 2 * 2 * 2
    assert len(rows) == len(diloco) + 2 + 1  # a DDP-equivalent per island count, one alone
    numel = json.loads((tmp_path / "one-island" / "summary.json").read_text())["shared_parameters"]
    for r in diloco:
        assert r["steps"] == STEPS
        payload = build_codec(r["codec"]).payload_bytes(numel)
        sent = (STEPS // r["H"]) * ring_allreduce_bytes(payload, r["islands"])
        assert r["bytes_sent"] == sent
        assert r["ddp_bytes"] == STEPS * ring_allreduce_bytes(4 * numel, r["islands"])
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows)
    assert (tmp_path / "sweep.png").stat().st_size > 0
