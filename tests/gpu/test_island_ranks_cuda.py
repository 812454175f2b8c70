"""Islands of several ranks on GPUs (issue 13): FSDP2 with nccl and bf16. Skipped without CUDA.

One GPU: a 1-rank FSDP2 island (nccl, bf16 autocast) trains and matches its DDP twin. Several
GPUs: one island of every GPU, DDP and FSDP2, against the same island batch on one rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from tests.harness import assert_ok, metrics_rows  # noqa: E402
from tests.torchrun import run_torchrun  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ONE_ISLAND = [
    "--config",
    str(ROOT / "configs" / "demo.yaml"),
    "transport.kind=torch",
    "transport.islands=1",
    "run.device=cuda",
    "run.precision=bf16",
    "run.progress=none",
    "outer.rounds=3",
    "outer.inner_steps=10",
    "model.n_layer=2",
    "model.d_model=128",
    "data.seq_len=64",
    "eval.every=1",
    "eval.batches=2",
]
RUN_S = 300.0


def _val_losses(run_dir: Path) -> list[float]:
    return [row["val_loss"] for row in metrics_rows(run_dir / "island-0")]


def test_a_one_gpu_fsdp_island_trains_in_bf16_with_nccl(tmp_path: Path) -> None:
    runs = {}
    for parallel in ("fsdp", "ddp"):
        run_dir = tmp_path / parallel
        args = [*ONE_ISLAND, f"run.dir={run_dir}", f"island.parallel={parallel}"]
        assert_ok(run_torchrun(1, [*args, "data.batch_size=8"], RUN_S))
        runs[parallel] = _val_losses(run_dir)
        summary = json.loads((run_dir / "island-0" / "summary.json").read_text())
        assert summary["device"].startswith("cuda")
    assert runs["fsdp"][-1] < runs["fsdp"][0]
    # bf16 autocast: the two wrappings differ in reduction order only.
    assert runs["fsdp"] == pytest.approx(runs["ddp"], rel=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs several GPUs")
def test_one_island_of_every_gpu_trains_like_one_rank_with_the_island_batch(
    tmp_path: Path,
) -> None:
    gpus = torch.cuda.device_count()
    alone = tmp_path / "alone"
    assert_ok(run_torchrun(1, [*ONE_ISLAND, f"run.dir={alone}", f"data.batch_size={4 * gpus}"],
                           RUN_S))  # fmt: skip
    for parallel in ("ddp", "fsdp"):
        run_dir = tmp_path / parallel
        args = [*ONE_ISLAND, f"run.dir={run_dir}", f"island.parallel={parallel}"]
        assert_ok(run_torchrun(gpus, [*args, "data.batch_size=4"], RUN_S))
        assert _val_losses(run_dir) == pytest.approx(_val_losses(alone), rel=2e-2)
