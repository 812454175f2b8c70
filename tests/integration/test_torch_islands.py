"""Two islands as two gloo processes running the real runtime agree bit for bit.

Each island is a spawned process calling `islands.island.run_island` with transport.kind=torch
on a TCPStore this test owns. The same config run with the local transport (both islands in
this process) is the reference: the torch group must produce the same shared parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import TINY, connect_store, spawn_children, tcp_store

from diloco.config import load_config
from diloco.metrics import read_metrics
from islands.island import run_island

ROUNDS = 3
OVERRIDES = [
    *TINY,
    f"outer.rounds={ROUNDS}",
    "outer.inner_steps=4",
    "inner.warmup_steps=2",
    "inner.lr=3e-3",
    "eval.every=1",
    "transport.islands=2",
    "transport.torch.timeout_s=60",
]


def _torch_island(port: int, rank: int, run_dir: str) -> dict[str, Any]:
    config = load_config(
        None, [*OVERRIDES, "transport.kind=torch", f"transport.rank={rank}", f"run.dir={run_dir}"]
    )
    summary = run_island(config, store=connect_store(port))
    rows = read_metrics(Path(run_dir) / f"island-{rank}" / "metrics.jsonl")
    return {"rows": rows, "summary": summary}


@pytest.fixture(scope="module")
def torch_islands(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both islands' metrics rows and summaries after a 2-process torch run."""
    run_dir = tmp_path_factory.mktemp("torch-run")
    store = tcp_store()
    return spawn_children(_torch_island, [(store.port, r, str(run_dir)) for r in (0, 1)], 90)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same config with both islands in this process (transport.kind=local)."""
    run_dir = tmp_path_factory.mktemp("local-run")
    config = load_config(None, [*OVERRIDES, "transport.kind=local", f"run.dir={run_dir}"])
    summary = run_island(config)
    return {"rows": read_metrics(run_dir / "metrics.jsonl"), "summary": summary}


@pytest.mark.timeout(120)
def test_islands_share_parameters_after_every_round(torch_islands: list[dict[str, Any]]) -> None:
    """Every round, both islands log the same params_sha256 (not only the last round), with
    one row per round and both islands counted."""
    rows_0, rows_1 = (island["rows"] for island in torch_islands)
    assert [row["round"] for row in rows_0] == list(range(1, ROUNDS + 1))
    assert [row["round"] for row in rows_1] == list(range(1, ROUNDS + 1))
    for row_0, row_1 in zip(rows_0, rows_1, strict=True):
        assert row_0["params_sha256"] == row_1["params_sha256"], f"round {row_0['round']}"
        assert row_0["islands"] == row_1["islands"] == 2
    assert len({row["params_sha256"] for row in rows_0}) == ROUNDS, "parameters did not move"
    summaries = [island["summary"] for island in torch_islands]
    assert summaries[0]["params_sha256"] == summaries[1]["params_sha256"]
    assert summaries[0]["params_sha256"] == rows_0[-1]["params_sha256"]
    assert [s["run_dir"].rsplit("/", 1)[-1] for s in summaries] == ["island-0", "island-1"]


@pytest.mark.timeout(120)
def test_torch_group_equals_local_group(
    torch_islands: list[dict[str, Any]], local_run: dict[str, Any]
) -> None:
    """Two gloo processes compute bit for bit what two in-process islands compute: the same
    params_sha256 after every round, hence the same losses. (With two islands and equal token
    weights, all_reduce's sum a/2 + b/2 is exactly what weighted_mean sums in island order.)"""
    torch_rows, local_rows = torch_islands[0]["rows"], local_run["rows"]
    assert [r["params_sha256"] for r in torch_rows] == [r["params_sha256"] for r in local_rows]
    assert [r["val_loss"] for r in torch_rows] == [r["val_loss"] for r in local_rows]
    assert [r["tokens"] for r in torch_rows] == [r["tokens"] for r in local_rows]
    assert torch_islands[0]["summary"]["params_sha256"] == local_run["summary"]["params_sha256"]
