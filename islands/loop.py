"""The outer rounds of the islands one process hosts: inner steps, sync, one row, a checkpoint.

The loop follows the shared state's round, not a counter: an island the group left behind
adopts the group's state (a later round) inside its sync.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from diloco.checkpoint import save_checkpoint
from islands.hosted import sync_all
from islands.outputs import (
    RoundTimings,
    checkpoint_dir,
    checkpoint_state,
    log_tensorboard,
    metrics_row,
)
from islands.runtime import RunEvents, Runtime

# The figures of a row an island sends its coordinator for the status page (a few numbers).
_REPORTED = ("round", "inner_step", "tokens", "train_loss", "val_loss", "bytes_sent", "sync_s")


@runtime_checkable
class ReportsMetrics(Protocol):
    """A transport that carries an island's latest figures to the group (grpc)."""

    def note_metrics(self, metrics: Mapping[str, float]) -> None: ...


def run_rounds(runtime: Runtime, start_round: int, events: RunEvents | None) -> None:
    config = runtime.config
    schedule = config.outer.schedule()
    if events is not None:
        hosted = len(runtime.hosted)
        events.on_start(
            schedule.total_steps() * hosted, schedule.steps_before(start_round) * hosted
        )
    on_step = events.on_step if events is not None else None
    lead = runtime.hosted[0].blocking
    while lead.round < config.outer.rounds:
        # H, or one step in the synchronous warm phase (outer.warmup_rounds).
        steps = schedule.steps_in_round(lead.round)
        begin = time.perf_counter()
        works = [island.run_inner(steps, on_step) for island in runtime.hosted]
        train_loss = torch.stack([w.loss_sum for w in works]).sum().item() / (steps * len(works))
        compute_s = time.perf_counter() - begin
        begin = time.perf_counter()
        results = sync_all(runtime.hosted, works, runtime.abort)
        timings = RoundTimings(compute_s=compute_s, sync_s=time.perf_counter() - begin)
        if config.outer.reset_inner_optimizer:
            for island in runtime.hosted:
                island.trainer.reset_optimizer_state()
        runtime.timings["compute_s"] += timings.compute_s
        runtime.timings["sync_s"] += timings.sync_s
        done = lead.round
        if runtime.island_ranks.writes_outputs and any(result.adopted for result in results):
            # The group's state may be older than ours (a coordinator restarted from the round
            # before): rows of rounds the group no longer has are dropped.
            runtime.metrics.truncate_after(done - 1)
        evaluate = done == config.outer.rounds or (
            config.eval.every > 0 and done % config.eval.every == 0
        )
        val_loss = runtime.hosted[0].trainer.evaluate(runtime.val_batches) if evaluate else None
        row = metrics_row(runtime, done, works[0], train_loss, val_loss, timings, results[0])
        if runtime.island_ranks.writes_outputs:
            runtime.metrics.write(row)
            log_tensorboard(runtime, row)
            if runtime.wandb is not None:
                runtime.wandb.log(row)
        _report(runtime, row)
        if events is not None:
            events.on_round(row)
        every = config.run.checkpoint_every
        if done == config.outer.rounds or (every > 0 and done % every == 0):
            save_checkpoint(
                checkpoint_dir(runtime),
                done,
                checkpoint_state(runtime),
                config.run.keep_checkpoints,
            )


def _report(runtime: Runtime, row: Mapping[str, object]) -> None:
    figures = {
        key: float(value)
        for key, value in row.items()
        if key in _REPORTED and isinstance(value, (int, float))
    }
    for island in runtime.hosted:
        for transport in island.transports():
            if isinstance(transport, ReportsMetrics):
                transport.note_metrics(figures)
