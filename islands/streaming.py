"""The streaming outer loop (Streaming DiLoCo: `diloco/outer/streaming.py`) in the runtime:
one transport lane per fragment, and rounds driven step by step.

Each inner step: every hosted island trains one step; then, for every island, the exchanges due
are merged (waiting if their mean is late: `blocked_s`), and the fragments whose sync point it
is are started; all islands start before any waits (hosted islands' exchanges are one
collective). A round is a period of H inner steps; it ends (one metrics row, a checkpoint when
due) tau steps after its last fragment's sync point, when that fragment has merged. The last
round ends when every exchange in flight has been merged.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diloco.checkpoint import save_checkpoint
from diloco.codecs.base import Codec
from diloco.config import IslandConfig
from diloco.errors import ConfigError
from diloco.outer.fragments import assign_fragments
from diloco.outer.streaming import StepReport, StreamingSync, StreamPlan
from diloco.shared_state import OuterOptimizer
from diloco.transports.base import BuiltTransports, TransportSetup
from diloco.transports.config import build_transports
from islands.outputs import (
    RoundTimings,
    checkpoint_dir,
    checkpoint_state,
    log_tensorboard,
    metrics_row,
)
from islands.runtime import RunEvents, Runtime


@dataclass
class Lanes:
    """One transport per fragment for each hosted island."""

    config: IslandConfig
    assignment: list[list[int]]
    built: list[BuiltTransports]

    @property
    def lead(self) -> BuiltTransports:
        return self.built[0]

    def abort(self) -> None:
        for built in self.built:
            built.abort()

    def stream(
        self, params: Sequence[torch.Tensor], hosted: int, codec: Codec, optimizer: OuterOptimizer
    ) -> StreamingSync:
        """The streaming sync of the `hosted`-th island this process runs."""
        outer = self.config.outer
        plan = StreamPlan(
            fragments=outer.fragments,
            inner_steps=outer.inner_steps,
            overlap_steps=outer.overlap_steps,
            mix=outer.mix,
            eager=outer.eager,
            error_feedback=outer.error_feedback,
            error_feedback_decay=outer.error_feedback_decay,
        )
        transports = [built.transports[hosted] for built in self.built]
        return StreamingSync(params, self.assignment, transports, codec, optimizer, plan)


def build_lanes(
    config: IslandConfig,
    model: torch.nn.Module,
    setup: TransportSetup,
    shard: Sequence[torch.Tensor] | None = None,
) -> Lanes:
    """The fragments of `model` and one transport lane per fragment.

    Args:
        shard: on an island of several ranks (FSDP2), the parameter shards this rank holds, in
            parameter order: the rank streams its shard of each fragment (fragments are still
            whole tensors of the model, the same on every rank and island).

    Raises:
        ConfigError: more fragments than the model has tensors, or a transport that cannot
            stream yet.
    """
    sizes = [p.numel() for p in model.parameters()]
    owned = sizes if shard is None else [t.numel() for t in shard]
    count = config.outer.fragments
    if count > len(sizes):
        raise ConfigError(
            f"outer.fragments must be at most the model's {len(sizes)} parameter tensors "
            f"(fragments are whole tensors), got {count}"
        )
    assignment = assign_fragments(sizes, count)
    built: list[BuiltTransports] = []
    for index, members in enumerate(assignment):
        numel = sum(owned[i] for i in members)
        # Lanes after the first reach their group through the island's first lane (hivemind).
        first = built[0].transports[0] if built else None
        bootstrap = (*setup.bootstrap, *getattr(first, "visible_maddrs", ()))
        name = f"fragment-{index}.{setup.lane}" if setup.lane else f"fragment-{index}"
        lane = dataclasses.replace(setup, numel=numel, lane=name, bootstrap=bootstrap)
        built.append(build_transports(lane))
    return Lanes(config, assignment, built)


def run_streaming(runtime: Runtime, events: RunEvents | None) -> None:
    config = runtime.config
    outer = config.outer
    total = outer.rounds * outer.inner_steps
    streams = [island.stream for island in runtime.hosted]
    assert all(stream is not None for stream in streams)
    lead = runtime.hosted[0]
    if events is not None:
        hosted = len(runtime.hosted)
        events.on_start(total * hosted, lead.stream.step * hosted if lead.stream else 0)
    window = _Window()
    while lead.round < outer.rounds:
        stream = lead.stream
        assert stream is not None
        if stream.step < total:
            _one_step(runtime, stream.step + 1, window, events)
        round_end = _round_end(config, stream.round + 1)
        if stream.step >= round_end or stream.step >= total:
            if stream.round + 1 == outer.rounds:
                for island in runtime.hosted:
                    assert island.stream is not None
                    window.add(island.stream.flush())
            _end_round(runtime, window, events)
            window = _Window()


def _round_end(config: IslandConfig, round: int) -> int:
    """The inner step after which round `round` (1-based) ends: tau steps after its last
    fragment's sync point (the H-th step of the round)."""
    outer = config.outer
    return round * outer.inner_steps + outer.overlap_steps


@dataclass
class _Window:
    """What happened since the last row."""

    loss_sum: float = 0.0
    steps: int = 0
    compute_s: float = 0.0
    sync_s: float = 0.0
    blocked_s: float = 0.0
    participants: int = 0
    begin: float = 0.0
    work: Any = None
    """The lead island's RoundWork of the last step (its cumulative counters)."""

    def __post_init__(self) -> None:
        self.begin = time.perf_counter()

    def add(self, report: StepReport) -> None:
        self.blocked_s += report.blocked_s
        if report.participants:
            self.participants = min(report.participants)


def _one_step(runtime: Runtime, step: int, window: _Window, events: RunEvents | None) -> None:
    begin = time.perf_counter()
    on_step = events.on_step if events is not None else None
    works = [island.run_inner(1, on_step) for island in runtime.hosted]
    window.loss_sum += float(torch.stack([w.loss_sum for w in works]).sum()) / len(works)
    window.steps += 1
    window.work = works[0]
    middle = time.perf_counter()
    window.compute_s += middle - begin
    report = StepReport()
    streams = [island.stream for island in runtime.hosted]
    for stream in streams:
        assert stream is not None
        stream.merge_due(step, report)
    started = [
        stream.start_due(step, work.tokens)
        for stream, work in zip(streams, works, strict=True)
        if stream is not None
    ]
    for stream, indices in zip(streams, started, strict=True):
        assert stream is not None
        stream.finish_started(indices, report)
        stream.step = step
    window.add(report)
    window.sync_s += time.perf_counter() - middle


def _end_round(runtime: Runtime, window: _Window, events: RunEvents | None) -> None:
    config = runtime.config
    for island in runtime.hosted:
        assert island.stream is not None
        window.blocked_s += island.stream.wait_in_flight()
        island.stream.round += 1
    lead = runtime.hosted[0]
    assert lead.stream is not None
    done = lead.stream.round
    evaluate = done == config.outer.rounds or (
        config.eval.every > 0 and done % config.eval.every == 0
    )
    val_loss = None
    if evaluate:
        with lead.stream.shared_params():
            val_loss = lead.trainer.evaluate(runtime.val_batches)
    row = _row(runtime, done, window, val_loss)
    if runtime.island_ranks.writes_outputs:
        runtime.metrics.write(row)
        log_tensorboard(runtime, row)
        if runtime.wandb is not None:
            runtime.wandb.log(row)
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


def _row(runtime: Runtime, done: int, window: _Window, val_loss: float | None) -> dict[str, Any]:
    lead = runtime.hosted[0]
    assert lead.stream is not None
    for island in runtime.hosted:  # the island counters the summary reads
        assert island.stream is not None
        island.bytes_sent = sum(f.bytes_sent for f in island.stream.fragments)
        island.bytes_received = sum(f.bytes_received for f in island.stream.fragments)
    wall_s = time.perf_counter() - window.begin
    timings = RoundTimings(compute_s=window.compute_s, sync_s=window.sync_s)
    runtime.timings["compute_s"] += window.compute_s
    runtime.timings["sync_s"] += window.sync_s
    train_loss = window.loss_sum / max(1, window.steps)
    row = metrics_row(runtime, done, window.work, train_loss, val_loss, timings)
    fragments = lead.stream.fragments
    row["islands"] = window.participants or runtime.num_islands
    row["params_sha256"] = lead.shared_sha256()
    row["blocked_s"] = round(window.blocked_s, 6)
    row["compute_utilization"] = round(window.compute_s / wall_s, 6) if wall_s > 0 else None
    # Every rank of an island streams its shard of each fragment: the island's are the sums.
    count = len(fragments)
    per_fragment = runtime.island_ranks.sum(
        [float(f.bytes_sent) for f in fragments] + [float(f.bytes_received) for f in fragments]
    )
    row["bytes_sent_per_fragment"] = [int(b) for b in per_fragment[:count]]
    row["bytes_received_per_fragment"] = [int(b) for b in per_fragment[count:]]
    return row
