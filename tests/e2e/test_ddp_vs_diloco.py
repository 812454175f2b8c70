"""examples/ddp_vs_diloco.py in a tiny setting: real DDP and DiLoCo processes, consistent outputs.

Two gloo processes per group; the bytes DDP's hook counted and the bytes the islands sent must
stand in the ratio that H and the codec predict, independently of the example's own formula.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import TINY

from diloco.codecs import build_codec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ddp_vs_diloco.py"
H, ROUNDS = 5, 2


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(EXAMPLE), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_tiny_comparison_writes_consistent_outputs(tmp_path: Path) -> None:
    args = ["--islands", "2", "--inner-steps", str(H), "--rounds", str(ROUNDS), "--codec", "int8"]
    done = _run([*args, "--out", str(tmp_path), *TINY], timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results.json", "table.md", "loss_vs_tokens.png", "loss_vs_bytes.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    runs, numel = results["runs"], results["numel"]
    assert set(runs) == {"ddp", "diloco", "one-island"}
    ddp, diloco, alone = runs["ddp"], runs["diloco"], runs["one-island"]
    # Same steps and tokens for DDP and DiLoCo; one island alone has half the tokens.
    assert ddp["steps_per_worker"] == diloco["steps_per_worker"] == alone["steps_per_worker"]
    assert ddp["tokens_all"] == diloco["tokens_all"] == 2 * alone["tokens_all"]
    assert len(ddp["curve"]) == len(diloco["curve"]) == ROUNDS
    # Two workers: DDP's ring share of the fp32 gradients is all of them, every step; each
    # island sends its int8 payload to the other once a round.
    assert ddp["bytes_sent"] == H * ROUNDS * 4 * numel
    assert diloco["bytes_sent"] == ROUNDS * build_codec("int8").payload_bytes(numel)
    assert alone["bytes_sent"] == 0
    ratio = ddp["bytes_sent"] / diloco["bytes_sent"]
    assert ratio == pytest.approx(results["predicted_bytes_ratio"], rel=1e-12)
    assert 3.9 * H < ratio < 4 * H  # int8: a byte per element plus one fp32 scale per block
    for run in runs.values():
        assert 0 <= run["comm_share"] < 1
        assert run["val_loss"] < 5.6  # below ln 256 = 5.55 plus slack: they all trained
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + 3
    assert f"{ratio:,.1f}×" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.timeout(60)
def test_gpu_mode_refuses_without_cuda(tmp_path: Path) -> None:
    done = _run(["--gpu", "--out", str(tmp_path)], timeout=50)
    assert done.returncode == 2
    assert done.stderr.strip() == "--gpu needs a CUDA device and torch sees none"
    assert not (tmp_path / "results.json").exists()
