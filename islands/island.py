"""The island runtime: build everything from one config, run the outer rounds, write outputs.

This is the only place that sees the whole config (the composition root): it builds the model,
the codec, the outer optimizer (one object, injected into every place that applies the outer
step), the transports, the data and the hosted islands. A process hosts one island
(multi-process transports) or all of them (the local transport); either way each round is:
every hosted island runs H inner steps, then all of them sync, then one metrics row and, when
due, one checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from diloco.checkpoint.atomic import write_atomic
from diloco.codecs.base import Codec
from diloco.codecs.registry import build_codec
from diloco.config import IslandConfig, to_container
from diloco.config.checks import check_gpt_memory, host_memory_bytes
from diloco.config.run import Device, Precision
from diloco.data.factory import build_data_sources
from diloco.data.selectors.base import SelectorSetup
from diloco.data.selectors.config import build_selectors
from diloco.errors import ConfigError, make_directory
from diloco.inner.trainer import InnerTrainer
from diloco.metrics import MetricsWriter
from diloco.metrics.wandb_log import WandbLogger
from diloco.models.build import build_model
from diloco.models.flops import train_flops_per_token
from diloco.models.weights import load_weights_
from diloco.outer.config import build_outer_optimizer
from diloco.outer.pseudo_gradient import flatten_params
from diloco.outer.sync import OuterHyperparams, OuterSync
from diloco.parallel.batches import island_batch_size
from diloco.shared_state import OuterOptimizer
from diloco.transports.base import Transport, TransportSetup
from diloco.transports.config import build_transports, hosts_every_island
from islands.fingerprint import group_fingerprint, group_settings
from islands.hosted import BatchSplit, HostedIsland
from islands.loop import run_rounds
from islands.outputs import check_tensorboard, open_tensorboard, write_plot, write_summary
from islands.ranks import (
    IslandRanks,
    build_rank_transports,
    first_addresses,
    launch_layout,
    shard_lane,
    start_island_ranks,
)
from islands.regime import regime_advice
from islands.replicas import Replica, build_replica, streamed_shard
from islands.resume import resume
from islands.runtime import RunEvents, Runtime
from islands.streaming import Lanes, build_lanes, run_streaming

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
    runtime = build_runtime(config, store, events)
    if not runtime.island_ranks.writes_outputs:
        events = None  # one progress display per island: its rank 0's
    try:
        start_round = resume(runtime)
        writes_outputs = runtime.island_ranks.writes_outputs
        if writes_outputs:
            # Opened once the run's folder is settled (a fresh start moves an earlier run aside).
            runtime.tensorboard = open_tensorboard(config, runtime.out_dir)
            runtime.wandb = WandbLogger.open(
                config.run.wandb, runtime.out_dir, to_container(config)
            )
            # Once, when the run is about to train (a config error stays one line).
            advice = regime_advice(config, runtime.island_ranks.count)
            if advice is not None:
                log.warning("%s", advice)
        if config.outer.streaming:
            run_streaming(runtime, events)
        else:
            run_rounds(runtime, start_round, events)
        summary = write_summary(runtime)
        if writes_outputs:
            write_plot(runtime)
        return summary
    finally:
        runtime.abort()
        for island in runtime.hosted:
            for transport in island.transports():
                transport.close()
            if island.stream is not None:
                island.stream.close()
        if runtime.tensorboard is not None:
            runtime.tensorboard.close()
        if runtime.wandb is not None:
            runtime.wandb.close()
        runtime.island_ranks.close()


def build_runtime(
    config: IslandConfig, store: Any = None, events: RunEvents | None = None
) -> Runtime:
    for key, reason in config.ignored_options().items():
        log.warning("%s is set but has no effect: %s", key, reason)
    check_tensorboard(config)
    make_directory("run.dir", config.run.dir)  # before the model and the transport are built
    device = _device(config)
    _check_memory(config, device)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    layout = launch_layout(config)
    island_ranks = start_island_ranks(config, layout, device, store)
    try:
        return _build(config, store, events, device, island_ranks)
    except BaseException:
        island_ranks.close()
        raise


def _build(
    config: IslandConfig,
    store: Any,
    events: RunEvents | None,
    device: torch.device,
    island_ranks: IslandRanks,
) -> Runtime:
    hosts_all = hosts_every_island(config.transport.kind)
    ranks = list(range(config.transport.islands)) if hosts_all else [island_ranks.layout.island]
    out_dir = Path(config.run.dir) if hosts_all else Path(config.run.dir) / f"island-{ranks[0]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.run.seed)
    prototype = build_model(
        config.model, context=config.data.seq_len, data_vocab_size=_data_vocab_size(config)
    )
    if config.run.init_from:
        load_weights_(prototype, config.run.init_from, key="run.init_from")
    numel = flatten_params(list(prototype.parameters())).numel()
    outer = config.outer
    codec = build_codec(
        outer.codec.value, block_size=outer.block_size, topk_fraction=outer.topk_fraction
    )
    optimizer = build_outer_optimizer(outer)
    fingerprint = group_fingerprint(config, prototype, island_ranks.layout)
    if island_ranks.writes_outputs:
        write_atomic(out_dir / "fingerprint.json", json.dumps(fingerprint, indent=2) + "\n")
    replicas = [build_replica(config, prototype, island_ranks, device) for _ in ranks]
    setup = TransportSetup(
        config=config.transport,
        codec=codec,
        numel=replicas[0].shard_numel,
        ranks=ranks,
        rounds=outer.rounds,
        optimizer=optimizer,
        group_settings=group_settings(config),
        run_dir=Path(config.run.dir),
        device=device,
        offload_state=outer.offload_state,
        store=store,
        group=island_ranks.mesh.shard_group,
        lane=shard_lane(island_ranks),
        announce=events.on_announce if events is not None else log.info,
    )
    lanes = None
    if outer.streaming:
        shard = streamed_shard(config, replicas[0])
        lanes = build_rank_transports(
            setup,
            island_ranks,
            lambda lane_setup: build_lanes(config, prototype, lane_setup, shard),
            lambda built: first_addresses(built.lead),
        )
        built = lanes.lead
    else:
        built = build_rank_transports(setup, island_ranks, build_transports, first_addresses)
    split = BatchSplit(
        island_rank=island_ranks.rank,
        ranks=island_ranks.count,
        grad_accum=config.inner.grad_accum,
        group=island_ranks.group,
    )
    hosted = _hosted_islands(
        config, prototype, ranks, replicas, built.transports, lanes, (codec, optimizer), split
    )
    log.info(
        "islands %s of %d on %s, %d shared parameters (%d on this rank), codec %s, outer "
        "optimizer %s",
        ranks,
        config.transport.islands,
        device,
        numel,
        setup.numel,
        codec.name,
        optimizer.name,
    )
    return Runtime(
        config=config,
        out_dir=out_dir,
        device=device,
        hosted=hosted,
        abort=built.abort if lanes is None else lanes.abort,
        val_batches=[b.inputs for b in hosted[0].data.val_batches(config.eval.batches)],
        numel=numel,
        fingerprint=fingerprint,
        metrics=MetricsWriter(out_dir / "metrics.jsonl"),
        island_ranks=island_ranks,
    )


def _hosted_islands(
    config: IslandConfig,
    prototype: torch.nn.Module,
    ranks: list[int],
    replicas: list[Replica],
    transports: list[Transport],
    lanes: Lanes | None,
    outer_step: tuple[Codec, OuterOptimizer],
    split: BatchSplit,
) -> list[HostedIsland]:
    """Every island this process hosts (`ranks`, the islands' indices, in the order of their
    replicas and transports): its trainer, data, selector and outer sync."""
    outer = config.outer
    codec, optimizer = outer_step
    device = _device(config)
    bf16 = config.run.precision is Precision.bf16 or (
        config.run.precision is Precision.auto and device.type == "cuda"
    )
    # data.batch_size is per rank and micro-batch: each rank draws the whole island batch.
    island_batch = island_batch_size(config.data.batch_size, split.ranks, config.inner.grad_accum)
    sources = build_data_sources(
        dataclasses.replace(config.data, batch_size=island_batch),
        islands=ranks,
        num_islands=config.transport.islands,
        seed=config.run.seed,
        vocab_size=int(getattr(prototype, "vocab_size", config.model.vocab_size)),
        cache_dir=Path(config.run.dir) / "token-cache",
    )
    selectors = build_selectors(
        SelectorSetup(
            data=config.data,
            model=config.model,
            ranks=ranks,
            device=device,
            bf16=bf16,
            seed=config.run.seed,
        )
    )
    total_steps = outer.schedule().total_steps()
    hyper = OuterHyperparams(
        inner_steps=outer.inner_steps,
        error_feedback=outer.error_feedback,
        error_feedback_decay=outer.error_feedback_decay,
    )
    flops_per_token = train_flops_per_token(prototype)
    if outer.offload_state and device.type != "cpu":
        raise ConfigError("outer.offload_state works with islands on the CPU (run.device=cpu)")
    hosted: list[HostedIsland] = []
    for rank, replica, transport, source, selector in zip(
        ranks, replicas, transports, sources, selectors, strict=True
    ):
        stream = None
        if lanes is not None:
            stream = lanes.stream(streamed_shard(config, replica), len(hosted), codec, optimizer)
        hosted.append(
            HostedIsland(
                rank=rank,
                model=replica.model,
                trainer=InnerTrainer(replica.inner_model, config.inner, total_steps, device, bf16),
                data=source,
                selector=selector,
                outer=None
                if lanes is not None
                else OuterSync(
                    replica.shard,
                    transport,
                    codec,
                    optimizer,
                    hyper,
                    _offload_dir(config, rank, split) if outer.offload_state else None,
                ),
                stream=stream,
                flops_per_token=flops_per_token,
                split=split,
            )
        )
    return hosted


def _offload_dir(config: IslandConfig, island: int, split: BatchSplit) -> Path:
    """Where a rank of an island keeps its outer state with outer.offload_state."""
    return Path(config.run.dir) / "outer-state" / f"island-{island}-rank-{split.island_rank}"


def _data_vocab_size(config: IslandConfig) -> int | None:
    """The vocabulary of the data's token ids, when the data source says it before it runs."""
    if config.data.name == "hf":
        from diloco.data.hf_tokenizer import load_tokenizer

        return load_tokenizer(config.data.hf.tokenizer).vocab_size
    return 256 if config.data.name in ("stdlib", "text") else None  # bytes


def _check_memory(config: IslandConfig, device: torch.device) -> None:
    """The built-in GPT's memory against the device it will run on (load_config checked only
    the host copy of the weights when the device was not known yet)."""
    if config.model.name != "gpt":
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        check_gpt_memory(config, on_cuda=True, available_bytes=total, where=str(device))
    elif config.run.device is not Device.cpu and (host := host_memory_bytes()) is not None:
        check_gpt_memory(config, on_cuda=False, available_bytes=host, where="this machine")


def _device(config: IslandConfig) -> torch.device:
    wanted = config.run.device
    if wanted is Device.cuda and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but no CUDA device is available")
    if wanted is Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun's, when it started us
    return torch.device("cuda", local_rank % torch.cuda.device_count())
