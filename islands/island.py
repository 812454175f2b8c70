"""The island runtime: build everything from one config, run the outer rounds, write outputs.

This is the only place that sees the whole config (the composition root). A process hosts
one island (multi-process transports) or all of them (the local transport); either way each
round is: every hosted island runs H inner steps, then all of them sync, then one metrics row
and, when due, one checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from diloco.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from diloco.codecs import Codec, build_codec
from diloco.config import IslandConfig, to_container
from diloco.config.schema import Device, Precision, TorchBackend, TransportKind
from diloco.data import build_data_sources
from diloco.data.selectors import SELECTORS
from diloco.errors import ConfigError
from diloco.inner import InnerTrainer
from diloco.metrics import MetricsWriter
from diloco.models import build_model
from diloco.outer import OuterHyperparams, OuterSync, flatten_params
from diloco.transports import LocalGroup, TorchDistributedTransport, Transport
from diloco.transports.base import ring_allreduce_bytes
from islands.hosted import HostedIsland, join_all, sync_all

log = logging.getLogger(__name__)


class RunEvents(Protocol):
    """What the CLI's progress display hears about (tests pass None)."""

    def on_start(self, total_steps: int, done_steps: int) -> None: ...
    def on_step(self) -> None: ...
    def on_round(self, row: dict[str, Any]) -> None: ...


@dataclass
class Runtime:
    """Everything one process needs to run its islands' rounds."""

    config: IslandConfig
    out_dir: Path
    device: torch.device
    hosted: list[HostedIsland]
    abort: Callable[[], None]
    val_batches: list[Any]
    numel: int
    metrics: MetricsWriter
    tensorboard: Any = None
    timings: dict[str, float] = field(default_factory=lambda: {"compute_s": 0.0, "sync_s": 0.0})

    @property
    def num_islands(self) -> int:
        return self.config.transport.islands


def run_island(
    config: IslandConfig, events: RunEvents | None = None, store: Any = None
) -> dict[str, Any]:
    """Run the islands this process hosts to the end of `config.outer.rounds`.

    Args:
        config: the validated config.
        events: progress callbacks (the CLI's display), or None.
        store: a torch.distributed store for the torch transport (tests own theirs).

    Returns:
        The summary, also written to summary.json.

    Raises:
        ConfigError: the config cannot be built (missing file, no GPU, bad factory).
    """
    runtime = build_runtime(config, store)
    try:
        start_round = resume(runtime)
        run_rounds(runtime, start_round, events)
        return finish(runtime)
    finally:
        runtime.abort()
        for island in runtime.hosted:
            island.outer.transport.close()
        if runtime.tensorboard is not None:
            runtime.tensorboard.close()


def build_runtime(config: IslandConfig, store: Any = None) -> Runtime:
    _warn_ignored_options(config)
    device = _device(config)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    bf16 = config.run.precision is Precision.bf16 or (
        config.run.precision is Precision.auto and device.type == "cuda"
    )
    kind = config.transport.kind
    num_islands = config.transport.islands
    rank = _rank(config)
    ranks = list(range(num_islands)) if kind is TransportKind.local else [rank]
    out_dir = Path(config.run.dir)
    if kind is not TransportKind.local:
        out_dir = out_dir / f"island-{rank}"
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.run.seed)
    prototype = build_model(config.model, context=config.data.seq_len)
    numel = flatten_params(list(prototype.parameters())).numel()
    codec = build_codec(config.outer.codec.value)
    transports, abort = _transports(config, codec, numel, ranks, device, store)
    sources = build_data_sources(
        config.data,
        islands=ranks,
        num_islands=num_islands,
        seed=config.run.seed,
        vocab_size=config.model.vocab_size,
    )
    total_steps = config.outer.rounds * config.outer.inner_steps
    hyper = OuterHyperparams(
        lr=config.outer.lr,
        momentum=config.outer.momentum,
        nesterov=config.outer.nesterov,
        inner_steps=config.outer.inner_steps,
    )
    hosted = []
    for rank_i, transport, source in zip(ranks, transports, sources, strict=True):
        model = copy.deepcopy(prototype).to(device)
        hosted.append(
            HostedIsland(
                rank=rank_i,
                model=model,
                trainer=InnerTrainer(model, config.inner, total_steps, device, bf16),
                data=source,
                selector=SELECTORS[config.data.selector.name.value](),
                outer=OuterSync(model.parameters(), transport, codec, hyper),
            )
        )
    log.info(
        "islands %s of %d on %s, %d shared parameters, codec %s",
        ranks,
        num_islands,
        device,
        numel,
        codec.name,
    )
    return Runtime(
        config=config,
        out_dir=out_dir,
        device=device,
        hosted=hosted,
        abort=abort,
        val_batches=[b.inputs for b in sources[0].val_batches(config.eval.batches)],
        numel=numel,
        metrics=MetricsWriter(out_dir / "metrics.jsonl"),
        tensorboard=_tensorboard(config, out_dir),
    )


def resume(runtime: Runtime) -> int:
    """Load the newest checkpoint the whole group holds; returns the round to start at."""
    checkpoints = runtime.out_dir / "checkpoints"
    available = list_checkpoints(checkpoints) if runtime.config.run.resume else []
    round = join_all(runtime.hosted, available, runtime.abort)
    if round is None:
        _start_afresh(runtime, checkpoints)
        return 0
    state = load_checkpoint(checkpoints, round)
    if state["numel"] != runtime.numel:
        raise ConfigError(
            f"the checkpoint in {checkpoints} holds {state['numel']} shared parameters, this "
            f"model has {runtime.numel}: use another run.dir or run.resume=false"
        )
    islands = {entry["rank"]: entry for entry in state["islands"]}
    for island in runtime.hosted:
        island.outer.load_state_dict(state["outer"])
        island.load_state_dict(islands[island.rank])
    torch.set_rng_state(state["rng"]["cpu"])
    if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    runtime.timings.update(state["timings"])
    runtime.metrics.truncate_after(round)
    log.info("resumed from %s at round %d", checkpoints, round)
    return round


def _start_afresh(runtime: Runtime, checkpoints: Path) -> None:
    # Checkpoints of an earlier run in this run.dir would outlive this run's own (pruning
    # keeps the highest rounds) and be resumed later on top of this run's metrics.
    stale = list_checkpoints(checkpoints)
    if stale:
        log.warning(
            "starting afresh in %s: removing %d checkpoint(s) of an earlier run (rounds %s)",
            runtime.out_dir,
            len(stale),
            stale,
        )
        for old in stale:
            checkpoint_path(checkpoints, old).unlink()
    runtime.metrics.reset()


def run_rounds(runtime: Runtime, start_round: int, events: RunEvents | None) -> None:
    config = runtime.config
    steps = config.outer.inner_steps
    if events is not None:
        per_round = steps * len(runtime.hosted)
        events.on_start(config.outer.rounds * per_round, start_round * per_round)
    on_step = events.on_step if events is not None else None
    for round in range(start_round, config.outer.rounds):
        begin = time.perf_counter()
        works = [island.run_inner(steps, on_step) for island in runtime.hosted]
        train_loss = torch.stack([w.loss_sum for w in works]).sum().item() / (steps * len(works))
        compute_s = time.perf_counter() - begin
        begin = time.perf_counter()
        results = sync_all(runtime.hosted, works, runtime.abort)
        sync_s = time.perf_counter() - begin
        if config.outer.reset_inner_optimizer:
            for island in runtime.hosted:
                island.trainer.reset_optimizer_state()
        runtime.timings["compute_s"] += compute_s
        runtime.timings["sync_s"] += sync_s
        done = round + 1
        evaluate = done == config.outer.rounds or (
            config.eval.every > 0 and done % config.eval.every == 0
        )
        val_loss = runtime.hosted[0].trainer.evaluate(runtime.val_batches) if evaluate else None
        row = _row(runtime, done, train_loss, val_loss, compute_s, sync_s, results[0].participants)
        runtime.metrics.write(row)
        _log_tensorboard(runtime, row)
        if events is not None:
            events.on_round(row)
        every = config.run.checkpoint_every
        if done == config.outer.rounds or (every > 0 and done % every == 0):
            save_checkpoint(
                runtime.out_dir / "checkpoints", done, _state(runtime), config.run.keep_checkpoints
            )


def finish(runtime: Runtime) -> dict[str, Any]:
    first = runtime.hosted[0]
    rows = runtime.metrics.path.read_text().splitlines()
    last = json.loads(rows[-1]) if rows else {}
    compute_s = runtime.timings["compute_s"]
    group_tokens = sum(island.tokens for island in runtime.hosted)
    summary = {
        "rounds": first.outer.round,
        "islands": runtime.num_islands,
        "hosted_islands": [island.rank for island in runtime.hosted],
        "inner_steps": first.trainer.step_count,
        "tokens": first.tokens,
        "tokens_all_islands": first.tokens * runtime.num_islands,
        "val_loss": last.get("val_loss"),
        "train_loss": last.get("train_loss"),
        "bytes_sent": first.bytes_sent,
        "bytes_received": first.bytes_received,
        "ddp_bytes_sent": last.get("ddp_bytes_sent", 0),
        "shared_parameters": runtime.numel,
        "compute_s": round(compute_s, 3),
        "sync_s": round(runtime.timings["sync_s"], 3),
        "inner_tokens_per_s": round(group_tokens / compute_s, 1) if compute_s > 0 else None,
        "params_sha256": first.outer.params_sha256(),
        "device": str(runtime.device),
        "run_dir": str(runtime.out_dir),
        "config": to_container(runtime.config),
    }
    temporary = runtime.out_dir / "summary.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(temporary, runtime.out_dir / "summary.json")
    return summary


def _row(
    runtime: Runtime,
    done: int,
    train_loss: float,
    val_loss: float | None,
    compute_s: float,
    sync_s: float,
    participants: int,
) -> dict[str, Any]:
    first = runtime.hosted[0]
    ddp_step_bytes = ring_allreduce_bytes(4 * runtime.numel, runtime.num_islands)
    return {
        "round": done,
        "inner_step": first.trainer.step_count,
        "tokens": first.tokens,
        "train_loss": round(train_loss, 6),
        "val_loss": None if val_loss is None else round(val_loss, 6),
        "bytes_sent": first.bytes_sent,
        "bytes_received": first.bytes_received,
        "ddp_bytes_sent": first.trainer.step_count * ddp_step_bytes,
        "sync_s": round(sync_s, 6),
        "compute_s": round(compute_s, 6),
        "islands": participants,
        "inner_lr": first.trainer.lr_at(max(0, first.trainer.step_count - 1)),
        "params_sha256": first.outer.params_sha256(),
        "time": round(time.time(), 3),
    }


def _state(runtime: Runtime) -> dict[str, Any]:
    return {
        "numel": runtime.numel,
        "outer": runtime.hosted[0].outer.state_dict(),
        "islands": [{"rank": i.rank, **i.state_dict()} for i in runtime.hosted],
        "rng": {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "timings": dict(runtime.timings),
        "config": to_container(runtime.config),
    }


def _warn_ignored_options(config: IslandConfig) -> None:
    """Say so when an option is accepted but has no effect (STYLE: nothing silent)."""
    defaults = IslandConfig()
    ignored = []
    if config.model.name != "gpt":
        gpt_keys = ("n_layer", "n_head", "d_model", "vocab_size", "dropout")
        ignored += [
            f"model.{key}"
            for key in gpt_keys
            if getattr(config.model, key) != getattr(defaults.model, key)
        ]
    elif config.model.args:
        ignored.append("model.args")
    if ":" not in config.data.name and config.data.args:
        ignored.append("data.args")
    if config.data.val_path and config.data.val_fraction != defaults.data.val_fraction:
        ignored.append("data.val_fraction")
    if config.transport.kind is TransportKind.local:
        if config.transport.torch != defaults.transport.torch:
            ignored.append("transport.torch")
        if config.transport.rank != defaults.transport.rank:
            ignored.append("transport.rank")
    for key in ignored:
        log.warning("%s is set but has no effect with this configuration", key)


def _device(config: IslandConfig) -> torch.device:
    wanted = config.run.device
    if wanted is Device.cuda and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but no CUDA device is available")
    if wanted is Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun's, when it started us
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _rank(config: IslandConfig) -> int:
    transport = config.transport
    if transport.kind is TransportKind.local:
        return 0
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) != transport.islands:
        raise ConfigError(
            f"transport.islands={transport.islands} but torchrun started WORLD_SIZE={world}"
        )
    if transport.rank >= 0:
        return transport.rank
    if "RANK" not in os.environ:
        raise ConfigError(
            "transport.rank is not set and RANK is not in the environment: start with torchrun "
            "or give transport.rank=<0..islands-1>"
        )
    return int(os.environ["RANK"])


def _transports(
    config: IslandConfig,
    codec: Codec,
    numel: int,
    ranks: list[int],
    device: torch.device,
    store: Any,
) -> tuple[list[Transport], Callable[[], None]]:
    if config.transport.kind is TransportKind.local:
        group = LocalGroup(config.transport.islands, codec, numel)
        return [group.transport(rank) for rank in ranks], group.abort
    settings = config.transport.torch
    backend = settings.backend.value
    if settings.backend is TorchBackend.auto:
        backend = "nccl" if device.type == "cuda" else "gloo"
    transport = TorchDistributedTransport(
        codec,
        numel,
        rank=ranks[0],
        num_islands=config.transport.islands,
        init_method=settings.init_method,
        backend=backend,
        timeout_s=settings.timeout_s,
        store=store,
    )
    return [transport], lambda: None


def _tensorboard(config: IslandConfig, out_dir: Path) -> Any:
    if not config.run.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "run.tensorboard is true but the tensorboard package is missing: "
            "pip install tensorboard"
        ) from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _log_tensorboard(runtime: Runtime, row: dict[str, Any]) -> None:
    if runtime.tensorboard is None:
        return
    for key in ("train_loss", "val_loss", "bytes_sent", "sync_s", "compute_s", "inner_lr"):
        if row.get(key) is not None:
            runtime.tensorboard.add_scalar(key, row[key], global_step=row["tokens"])
    runtime.tensorboard.flush()
