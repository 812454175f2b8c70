"""examples/own_training_loop.py: DiLoCo hooked into a user's own loop trains, alone and in
a torchrun group of two whose islands hold identical parameters after every round."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_training_loop.py"
ROW = re.compile(
    r"island (\d+)\s+round\s+(\d+)\s+step\s+\d+\s+loss ([\d.]+)\s+"
    r"islands (\d+)\s+params ([0-9a-f]{12})"
)


def _run(command: list[str]) -> list[tuple[int, int, float, int, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [
        (int(i), int(r), float(loss), int(n), h) for i, r, loss, n, h in ROW.findall(done.stdout)
    ]


@pytest.mark.timeout(180)
def test_own_loop_alone_lowers_the_loss() -> None:
    rows = _run([sys.executable, str(EXAMPLE), "--steps", "200", "--inner-steps", "20"])
    assert [r[1] for r in rows] == list(range(10))
    assert all(r[3] == 1 for r in rows)
    assert rows[-1][2] < 0.2 * rows[0][2]


@pytest.mark.timeout(240)
def test_own_loop_under_torchrun_two_islands() -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    rows = _run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            str(EXAMPLE),
            "--steps",
            "100",
            "--inner-steps",
            "20",
        ]
    )
    by_island = {i: [r for r in rows if r[0] == i] for i in (0, 1)}
    assert [r[1] for r in by_island[0]] == [r[1] for r in by_island[1]] == list(range(5))
    assert all(r[3] == 2 for r in rows)
    # Different data, same shared parameters after every round.
    assert [r[4] for r in by_island[0]] == [r[4] for r in by_island[1]]
    assert by_island[0][-1][2] < 0.5 * by_island[0][0][2]
