"""The island runtime: build everything from one config, run the outer rounds, write outputs.

This is the only place that sees the whole config (the composition root). A process hosts
one island (multi-process transports) or all of them (the local transport); either way each
round is: every hosted island runs H inner steps, then all of them sync, then one metrics row
and, when due, one checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diloco.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from diloco.codecs import Codec, build_codec
from diloco.config import IslandConfig
from diloco.config.schema import Device, Precision, TorchBackend, TransportKind
from diloco.data import build_data_sources
from diloco.data.selectors import build_selectors
from diloco.errors import ConfigError
from diloco.inner import InnerTrainer
from diloco.metrics import MetricsWriter
from diloco.models import build_model
from diloco.outer import OuterHyperparams, OuterSync, flatten_params, params_sha256
from diloco.transports import (
    LocalGroup,
    SharedStateSource,
    TorchDistributedTransport,
    Transport,
)
from islands.coordinator import grpc_island_transport
from islands.hivemind import hivemind_island_transport
from islands.hosted import HostedIsland, join_all, sync_all
from islands.outputs import (
    checkpoint_state,
    log_tensorboard,
    metrics_row,
    open_tensorboard,
    write_summary,
)
from islands.runtime import RunEvents, Runtime

log = logging.getLogger(__name__)


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
        return write_summary(runtime)
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
    codec = build_codec(
        config.outer.codec.value,
        block_size=config.outer.block_size,
        topk_fraction=config.outer.topk_fraction,
    )
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
        error_feedback=config.outer.error_feedback,
        error_feedback_decay=config.outer.error_feedback_decay,
    )
    selectors = build_selectors(
        config.data, config.model, ranks=ranks, device=device, bf16=bf16, seed=config.run.seed
    )
    hosted = []
    for rank_i, transport, source, selector in zip(
        ranks, transports, sources, selectors, strict=True
    ):
        model = copy.deepcopy(prototype).to(device)
        hosted.append(
            HostedIsland(
                rank=rank_i,
                model=model,
                trainer=InnerTrainer(model, config.inner, total_steps, device, bf16),
                data=source,
                selector=selector,
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
        fingerprint=group_fingerprint(config, prototype),
        metrics=MetricsWriter(out_dir / "metrics.jsonl"),
        tensorboard=open_tensorboard(config, out_dir),
    )


def resume(runtime: Runtime) -> int:
    """Load the newest checkpoint the whole group holds; returns the round to start at."""
    checkpoints = runtime.out_dir / "checkpoints"
    available = list_checkpoints(checkpoints) if runtime.config.run.resume else []
    round = join_all(runtime.hosted, available, runtime.fingerprint, runtime.abort)
    if round is not None:
        _load_checkpoint(runtime, checkpoints, round)
    else:
        _start_afresh(runtime, checkpoints)
    return _catch_up_with_group(runtime)


def _catch_up_with_group(runtime: Runtime) -> int:
    """Adopt the group's shared state when the transport keeps one and it is newer than ours.

    A restarted island resumes its own inner state from its checkpoint, a new one starts
    afresh; either way the anchor and outer momentum are the group's, and it joins at the
    group's next round.
    """
    lead = runtime.hosted[0].outer
    transport = lead.transport
    if not isinstance(transport, SharedStateSource):
        return lead.round
    group_state = transport.shared_state(lead.shared_state())
    if group_state is not None:
        log.info("joining the group at round %d with its shared state", group_state.round)
        for island in runtime.hosted:
            island.outer.adopt(group_state)
        runtime.metrics.truncate_after(group_state.round)
    return lead.round


def _load_checkpoint(runtime: Runtime, checkpoints: Path, round: int) -> None:
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
    lead = runtime.hosted[0].outer
    # The loop follows the shared state's round, not a counter: an island the group left
    # behind adopts the group's state (a later round) inside its sync.
    while lead.round < config.outer.rounds:
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
        done = lead.round
        if any(result.adopted for result in results):
            # The group's state may be older than ours (a coordinator restarted from the round
            # before): rows of rounds the group no longer has are dropped.
            runtime.metrics.truncate_after(done - 1)
        evaluate = done == config.outer.rounds or (
            config.eval.every > 0 and done % config.eval.every == 0
        )
        val_loss = runtime.hosted[0].trainer.evaluate(runtime.val_batches) if evaluate else None
        row = metrics_row(
            runtime, done, train_loss, val_loss, compute_s, sync_s, results[0].participants
        )
        runtime.metrics.write(row)
        log_tensorboard(runtime, row)
        if events is not None:
            events.on_round(row)
        every = config.run.checkpoint_every
        if done == config.outer.rounds or (every > 0 and done % every == 0):
            save_checkpoint(
                runtime.out_dir / "checkpoints",
                done,
                checkpoint_state(runtime),
                config.run.keep_checkpoints,
            )


def group_fingerprint(config: IslandConfig, model: torch.nn.Module) -> dict[str, str]:
    """What must be equal on every island of a group, by name (checked when islands join).

    The model's parameter names, shapes and dtypes; its initial weights (a model factory
    must build the same weights everywhere); and the settings the outer rounds depend on.
    """
    shapes = "\n".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in model.named_parameters())
    return {
        "model": hashlib.sha256(shapes.encode()).hexdigest()[:16],
        "initial weights": params_sha256(flatten_params(list(model.parameters())))[:16],
        **group_settings(config),
    }


def group_settings(config: IslandConfig) -> dict[str, str]:
    """The settings part of the fingerprint: what a coordinator, which has no model, checks."""
    outer = config.outer
    return {
        "outer.rounds": str(outer.rounds),
        "outer.inner_steps": str(outer.inner_steps),
        "outer.codec, block_size, topk_fraction": (
            f"{outer.codec.value}, {outer.block_size}, {outer.topk_fraction}"
        ),
        "outer.lr, momentum, nesterov": f"{outer.lr}, {outer.momentum}, {outer.nesterov}",
        "transport.islands": str(config.transport.islands),
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
    codec = config.outer.codec.value
    if codec in ("none", "fp16", "bf16") and config.outer.block_size != defaults.outer.block_size:
        ignored.append("outer.block_size")
    if codec != "topk" and config.outer.topk_fraction != defaults.outer.topk_fraction:
        ignored.append("outer.topk_fraction")
    if not config.outer.error_feedback and config.outer.error_feedback_decay != 1.0:
        ignored.append("outer.error_feedback_decay")
    transport, kind = config.transport, config.transport.kind
    if kind is TransportKind.local:
        if transport.torch != defaults.transport.torch:
            ignored.append("transport.torch")
        if transport.rank != defaults.transport.rank:
            ignored.append("transport.rank")
    if kind is not TransportKind.torch and transport.torch != defaults.transport.torch:
        ignored.append("transport.torch")
    if kind is not TransportKind.grpc:
        if transport.grpc != defaults.transport.grpc:
            ignored.append("transport.grpc")
        ignored += [
            f"transport.{key}"
            for key in ("aggregate", "trim_fraction", "clip_norm")
            if getattr(transport, key) != getattr(defaults.transport, key)
        ]
    if transport.aggregate.value != "trimmed_mean" and (
        transport.trim_fraction != defaults.transport.trim_fraction
    ):
        ignored.append("transport.trim_fraction")
    if kind is not TransportKind.hivemind and transport.hivemind != defaults.transport.hivemind:
        ignored.append("transport.hivemind")
    for key in dict.fromkeys(ignored):  # in order, once each
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
    if config.transport.kind is TransportKind.hivemind:
        return [hivemind_island_transport(config, codec, numel, ranks[0])], lambda: None
    if config.transport.kind is TransportKind.grpc:
        return [grpc_island_transport(config, codec, numel, ranks[0])], lambda: None
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
