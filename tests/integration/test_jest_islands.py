"""JEST inside the runtime: the same selection under the local and torch transports, a frozen
reference, and the selection metrics in metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from harness import TINY, connect_store, spawn_children, tcp_store

from diloco.config import load_config
from diloco.metrics import read_metrics
from islands.island import build_runtime, resume, run_island, run_rounds

OVERRIDES = [
    *TINY,
    "outer.rounds=2",
    "outer.inner_steps=3",
    "inner.warmup_steps=1",
    "transport.islands=2",
    "transport.torch.timeout_s=60",
    "data.noise=0.5",
    "data.selector.name=jest",
    "data.selector.ratio=0.25",
    "data.selector.temperature=1.0",
    "data.selector.reference.train_steps=3",
    "data.selector.reference.d_model=16",
]


def _torch_island(port: int, rank: int, run_dir: str) -> list[dict[str, Any]]:
    config = load_config(
        None, [*OVERRIDES, "transport.kind=torch", f"transport.rank={rank}", f"run.dir={run_dir}"]
    )
    run_island(config, store=connect_store(port))
    return read_metrics(Path(run_dir) / f"island-{rank}" / "metrics.jsonl")


@pytest.mark.timeout(120)
def test_reference_never_changes_and_metrics_report_selection(tmp_path: Path) -> None:
    config = load_config(None, [*OVERRIDES, f"run.dir={tmp_path}"])
    runtime = build_runtime(config)
    try:
        references = {id(island.selector.reference) for island in runtime.hosted}  # type: ignore[attr-defined]
        assert len(references) == 1, "the hosted islands share one reference"
        reference = runtime.hosted[0].selector.reference  # type: ignore[attr-defined]
        before = [p.detach().clone() for p in reference.parameters()]
        run_rounds(runtime, resume(runtime), None)
        after = list(reference.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert not any(p.requires_grad for p in after)
    finally:
        runtime.abort()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    last = rows[-1]
    assert last["learner_flops"] > 0 and last["scoring_flops"] > rows[0]["scoring_flops"] > 0
    assert last["reference_flops"] > 0 and last["scoring_s"] > 0
    assert 0 <= last["selected_noisy_fraction"] <= 1


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_torch_transport_selects_what_the_local_transport_selects(tmp_path: Path) -> None:
    """Each island selects locally from its own seeded stream: two gloo processes and two
    in-process islands keep the same examples, so their shared parameters agree bit for bit."""
    store = tcp_store()
    torch_rows = spawn_children(
        _torch_island, [(store.port, rank, str(tmp_path / "torch")) for rank in (0, 1)], 150
    )
    local = load_config(None, [*OVERRIDES, f"run.dir={tmp_path / 'local'}"])
    run_island(local)
    local_rows = read_metrics(tmp_path / "local" / "metrics.jsonl")
    assert [r["params_sha256"] for r in torch_rows[0]] == [r["params_sha256"] for r in local_rows]
    assert [r["params_sha256"] for r in torch_rows[1]] == [r["params_sha256"] for r in local_rows]
    keys = ("scoring_flops", "selected_noisy_fraction", "reference_flops", "learner_flops")
    assert [[r[k] for k in keys] for r in torch_rows[0]] == [
        [r[k] for k in keys] for r in local_rows
    ]
