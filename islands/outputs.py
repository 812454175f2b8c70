"""What a run writes: metrics rows, checkpoint contents, summary.json, TensorBoard events.

The output contract is in docs/output.md; the field names here are public.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diloco.checkpoint.atomic import write_atomic
from diloco.config import IslandConfig, to_container
from diloco.errors import ConfigError
from diloco.metrics.jsonl import read_metrics, to_strict_json
from diloco.outer.sync import SyncResult
from diloco.transports.base import ring_allreduce_bytes
from islands.hosted import RoundWork
from islands.regime import regime_advice
from islands.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundTimings:
    compute_s: float
    """Wall time of the round's inner steps (all hosted islands)."""
    sync_s: float
    """Wall time of the round's sync (all hosted islands, concurrently)."""


def checkpoint_dir(runtime: Runtime) -> Path:
    """Where this process keeps its checkpoints: `checkpoints/`, or `checkpoints/rank-<r>/`
    on an island of several ranks (each rank holds its own shard and inner state)."""
    ranks = runtime.island_ranks
    base = runtime.out_dir / "checkpoints"
    return base / f"rank-{ranks.rank}" if ranks.count > 1 else base


def island_bytes(runtime: Runtime) -> dict[str, Any]:
    """The lead island's bytes sent and received, summed over its ranks (a collective on an
    island of several ranks, which also get the per-rank figures)."""
    lead = runtime.hosted[0]
    per_rank = runtime.island_ranks.gather((lead.bytes_sent, lead.bytes_received))
    figures: dict[str, Any] = {
        "bytes_sent": sum(sent for sent, _ in per_rank),
        "bytes_received": sum(received for _, received in per_rank),
    }
    if len(per_rank) > 1:
        figures["bytes_sent_per_rank"] = [sent for sent, _ in per_rank]
        figures["bytes_received_per_rank"] = [received for _, received in per_rank]
    return figures


def write_summary(runtime: Runtime) -> dict[str, Any]:
    """summary.json, written by the island's rank 0 (every rank calls this: the hash and the
    bytes are collectives over the island's ranks); other ranks get the dict unwritten."""
    first = runtime.hosted[0]
    params_sha256 = first.shared_sha256()
    bytes_figures = island_bytes(runtime)
    ranks = runtime.island_ranks
    if not ranks.writes_outputs:
        return {"island_rank": ranks.rank, "params_sha256": params_sha256, **bytes_figures}
    rows = runtime.metrics.path.read_text().splitlines() if runtime.metrics.path.exists() else []
    last = json.loads(rows[-1]) if rows else {}
    compute_s = runtime.timings["compute_s"]
    group_tokens = sum(island.tokens for island in runtime.hosted)
    summary = {
        "rounds": first.round,
        "islands": runtime.num_islands,
        "hosted_islands": [island.rank for island in runtime.hosted],
        "inner_steps": first.trainer.step_count,
        "tokens": first.tokens,
        "tokens_all_islands": first.tokens * runtime.num_islands,
        "val_loss": last.get("val_loss"),
        "train_loss": last.get("train_loss"),
        **bytes_figures,
        "ddp_bytes_sent": last.get("ddp_bytes_sent", 0),
        "shared_parameters": runtime.numel,
        "compute_s": round(compute_s, 3),
        "sync_s": round(runtime.timings["sync_s"], 3),
        "inner_tokens_per_s": round(group_tokens / compute_s, 1) if compute_s > 0 else None,
        "params_sha256": params_sha256,
        "island_ranks": ranks.count,
        "regime_advice": regime_advice(runtime.config, ranks.count),
        "device": str(runtime.device),
        "run_dir": str(runtime.out_dir),
        "config": to_container(runtime.config),
    }
    write_atomic(runtime.out_dir / "summary.json", to_strict_json(summary, indent=2) + "\n")
    return summary


def metrics_row(
    runtime: Runtime,
    done: int,
    work: RoundWork,
    train_loss: float,
    val_loss: float | None,
    timings: RoundTimings,
    result: SyncResult | None = None,
) -> dict[str, Any]:
    """One metrics.jsonl row (`done` rounds complete) from what the lead island did this round
    (`work`, `result`) and its cumulative counters."""
    lead = runtime.hosted[0]
    ddp_step_bytes = ring_allreduce_bytes(4 * runtime.numel, runtime.num_islands)
    return {
        "round": done,
        "inner_step": work.inner_step,
        "tokens": lead.tokens,
        "train_loss": round(train_loss, 6),
        "val_loss": None if val_loss is None else round(val_loss, 6),
        **island_bytes(runtime),
        "ddp_bytes_sent": work.inner_step * ddp_step_bytes,
        "sync_s": round(timings.sync_s, 6),
        "compute_s": round(timings.compute_s, 6),
        "islands": result.participants if result is not None else runtime.num_islands,
        "inner_lr": work.inner_lr,
        **work.selection,
        "params_sha256": result.params_sha256 if result is not None else "",
        "time": round(time.time(), 3),
    }


def checkpoint_state(runtime: Runtime) -> dict[str, Any]:
    lead = runtime.hosted[0]
    return {
        "numel": lead.outer.numel if lead.outer is not None else runtime.numel,
        "outer": (
            lead.outer.state_dict()
            if lead.outer is not None
            else {"anchor": lead.shared_flat(), "streaming": True}
        ),
        "islands": [{"rank": i.rank, **i.state_dict()} for i in runtime.hosted],
        "rng": {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "timings": dict(runtime.timings),
        "config": to_container(runtime.config),
    }


def open_tensorboard(config: IslandConfig, out_dir: Path) -> Any:
    if not config.run.tensorboard:
        return None
    return _summary_writer()(str(out_dir / "tensorboard"))


def check_tensorboard(config: IslandConfig) -> None:
    """Refuse run.tensorboard without its package before anything starts (exit 2)."""
    if config.run.tensorboard:
        _summary_writer()


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "run.tensorboard is true but the tensorboard package is missing: "
            "pip install tensorboard"
        ) from None
    return SummaryWriter


def write_plot(runtime: Runtime) -> None:
    """loss.png next to metrics.jsonl: train/val loss against tokens and against bytes sent."""
    from diloco.metrics.plots import plots_available, write_loss_plot

    rows = read_metrics(runtime.metrics.path)
    if not write_loss_plot(rows, runtime.out_dir / "loss.png") and not plots_available():
        log.info("no loss.png: matplotlib is not installed (pip install -e '.[plots]')")


def log_tensorboard(runtime: Runtime, row: dict[str, Any]) -> None:
    if runtime.tensorboard is None:
        return
    for key in ("train_loss", "val_loss", "bytes_sent", "sync_s", "compute_s", "inner_lr"):
        if row.get(key) is not None:
            runtime.tensorboard.add_scalar(key, row[key], global_step=row["tokens"])
    runtime.tensorboard.flush()
