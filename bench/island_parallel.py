"""A multi-rank island's inner loop against plain PyTorch DDP / FSDP2, and its memory per rank.

For each of `ddp` and `fsdp`, one island of `--ranks` processes (gloo on the CPU, nccl on
GPUs) trains the built-in GPT two ways in the same processes: `ours` is the island's library
path (`wrap_model`, `rank_micro_batches`, `InnerTrainer.train_step`: lr schedule, two AdamW
groups, clipping 1.0, bf16 autocast on a GPU); `plain` is a bare loop written here over the
same wrapper kind (DistributedDataParallel, or `fully_shard` on each block then the root)
with one AdamW and the same clip. The loops alternate in blocks, each first in every other
pair, so that a load change on a shared machine hits both alike; the ratio is the median over
pairs of blocks (issue 13's target: >= 0.97).

Peak RSS per rank (VmHWM) is the high-water mark of one block of `ours` training alone,
before `plain` exists, after warm-up steps and with freed pages handed back to the OS (so the
full replica each rank builds before `fully_shard`, then frees, is not counted). The one-rank
island (island.parallel=none, the same per-rank batch), run in its own process, is the
reference. `above base` leaves out what the process held before building the model (the
interpreter, torch, the process group). The peak includes what a step allocates and frees
(FSDP2's gathered blocks and gradient buffers, which glibc does not always hand back at once);
`held` is the RSS after the block with freed pages handed back: what training keeps. The
exact column counts what FSDP2 shards: the bytes of parameters and AdamW moments this rank
holds. Timings on a shared CPU box are noisy: read the ratio, not the rate.

    python bench/island_parallel.py [--steps 6] [--blocks 4] [--ranks 2] [--batch 4]
        [--seq-len 64] [--n-layer 4] [--d-model 256] [--grad-accum 1]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import multiprocessing as mp
import platform
import queue
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diloco.inner import InnerTrainer
from diloco.inner.config import InnerConfig
from diloco.models.gpt import GPT, GPTConfig
from diloco.parallel import (
    IslandMesh,
    Parallelism,
    build_mesh,
    local_parameters,
    rank_micro_batches,
    resolve_mesh,
    sharded_blocks,
    wrap_model,
)

VOCAB = 256


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def release_freed_memory() -> None:
    """Hand the allocator's freed pages back to the OS (glibc), so that RSS counts live data."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0: clear_refs "5")."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def new_model(args: argparse.Namespace, device: torch.device) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=args.n_layer,
        n_head=max(1, args.d_model // 64),
        d_model=args.d_model,
        vocab_size=VOCAB,
        context=args.seq_len,
    )
    return GPT(config).to(device)


def island_batches(args: argparse.Namespace, ranks: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    rows = args.batch * ranks * args.grad_accum
    return [
        torch.randint(0, VOCAB, (rows, args.seq_len + 1), generator=generator) for _ in range(count)
    ]


def ours_step(
    args: argparse.Namespace, mesh: IslandMesh, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], InnerTrainer]:
    """One inner step of the island's library path on an island batch, and its trainer."""
    model = wrap_model(new_model(args, device), mesh, device)
    inner = InnerConfig(lr=1e-3, warmup_steps=2, grad_accum=args.grad_accum)
    trainer = InnerTrainer(model, inner, 10**6, device, bf16=device.type == "cuda")
    layout = mesh.layout

    def step(tokens: torch.Tensor) -> torch.Tensor:
        micro = rank_micro_batches(
            tokens,
            island_rank=layout.island_rank,
            ranks=layout.ranks_per_island,
            grad_accum=args.grad_accum,
        )
        return trainer.train_step(*micro)

    return step, trainer


def state_mib(trainer: InnerTrainer) -> float:
    """MiB of parameters and AdamW state this rank holds (FSDP2: its shards), exactly."""
    tensors = local_parameters(trainer.model)
    for state in trainer.optimizer.state.values():
        tensors += [_local(v) for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def plain_step(
    args: argparse.Namespace, parallel: Parallelism, group: Any, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One step of a bare DDP / FSDP2 loop (accumulating with no_sync /
    set_requires_gradient_sync as their docs show)."""
    model: torch.nn.Module = new_model(args, device)
    if parallel is Parallelism.ddp:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=ids, process_group=group
        )
    elif parallel is Parallelism.fsdp:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        device_mesh = DeviceMesh.from_group(group, device.type)
        for block in sharded_blocks(model):
            fully_shard(block, mesh=device_mesh)
        fully_shard(model, mesh=device_mesh)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    rank, ranks, accum = dist.get_rank(group), dist.get_world_size(group), args.grad_accum
    bf16 = device.type == "cuda"

    def step(tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens.shape[0] // (ranks * accum)
        for k in range(accum):
            last = k == accum - 1
            if parallel is Parallelism.fsdp:
                model.set_requires_gradient_sync(last)  # type: ignore[operator]
            first = (rank * accum + k) * rows
            inputs = tokens[first : first + rows].to(device)
            paused = parallel is Parallelism.ddp and not last
            context = model.no_sync() if paused else contextlib.nullcontext()  # type: ignore[operator]
            with context, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(inputs) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def timed_block(step: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor]) -> float:
    """Seconds for one step per batch (the device waited for at the end)."""
    start = time.perf_counter()
    for tokens in batches:
        loss = step(tokens)
    loss.item()
    return time.perf_counter() - start


def rank_main(
    port: int, rank: int, ranks: int, parallel_name: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One rank: ours alone (peak RSS), then ours and plain in alternating blocks."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(
        "127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120)
    )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=ranks)
    try:
        parallel = Parallelism(parallel_name)
        layout = resolve_mesh(
            world_size=ranks,
            world_rank=rank,
            num_islands=1,
            islands_share_world=False,
            configured_ranks=ranks,
            parallel=parallel,
        )
        mesh = build_mesh(layout, device)
        batches = island_batches(args, ranks, args.steps)
        release_freed_memory()
        base_mib = rss_mib("VmRSS")
        ours, trainer = ours_step(args, mesh, device)
        timed_block(ours, batches[:2])  # warm-up
        release_freed_memory()  # building the full replica before sharding is not training
        reset_peak_rss()
        times: dict[str, list[float]] = {"ours": [timed_block(ours, batches)], "plain": []}
        peak_mib = rss_mib("VmHWM")
        release_freed_memory()
        result = {
            "peak_mib": peak_mib,
            "held_mib": rss_mib("VmRSS"),
            "base_mib": base_mib,
            "state_mib": state_mib(trainer),
            "device": str(device),
        }
        if parallel is Parallelism.none:
            result["tokens_per_s"] = _island_tokens(args, ranks) / min(times["ours"])
            return result
        plain = plain_step(args, parallel, mesh.island_group, device)
        timed_block(plain, batches[:2])
        for block in range(args.blocks):
            order = ("plain", "ours") if block % 2 == 0 else ("ours", "plain")
            for name in order:
                times[name].append(timed_block(ours if name == "ours" else plain, batches))
        times["ours"] = times["ours"][1:]  # the block before plain existed is left out
        result["times"] = times
        return result
    finally:
        dist.destroy_process_group()


def _island_tokens(args: argparse.Namespace, ranks: int) -> float:
    return args.steps * args.batch * ranks * args.grad_accum * args.seq_len


def _child(results: Any, rank: int, *args: Any) -> None:
    try:
        results.put((rank, rank_main(*args)))
    except BaseException as error:  # reported by the parent
        results.put((rank, error))


def run_island(parallel: str, ranks: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One island of `ranks` spawned processes; each rank's result."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = mp.get_context("spawn")
    results = context.Queue()
    children = [
        context.Process(target=_child, args=(results, r, store.port, r, ranks, parallel, args))
        for r in range(ranks)
    ]
    for child in children:
        child.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < ranks:
            try:
                rank, value = results.get(timeout=args.timeout_s)
            except queue.Empty:
                raise RuntimeError(f"{parallel}: no result within {args.timeout_s} s") from None
            if isinstance(value, BaseException):
                raise RuntimeError(f"{parallel} rank {rank} failed") from value
            got[rank] = value
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    return [got[r] for r in range(ranks)]


def summarize(
    parallel: str, ranks: list[dict[str, Any]], tokens: float
) -> tuple[float, float, float]:
    """(ours tokens/s, plain tokens/s, median ratio over pairs of blocks) of rank 0's clock."""
    times = ranks[0]["times"]
    ratios = [p / o for o, p in zip(times["ours"], times["plain"], strict=True)]
    return (
        tokens / statistics.median(times["ours"]),
        tokens / statistics.median(times["plain"]),
        statistics.median(ratios),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="inner steps per timed block")
    parser.add_argument("--blocks", type=int, default=4, help="timed blocks per loop")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="data.batch_size (per rank)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (cpu)")
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args()

    single = run_island("none", 1, args)[0]
    rows = []
    for parallel in ("ddp", "fsdp"):
        ranks = run_island(parallel, args.ranks, args)
        ours, plain, ratio = summarize(parallel, ranks, _island_tokens(args, args.ranks))
        rows.append((parallel, ours, plain, ratio, ranks))

    params = new_model(args, torch.device("cpu")).num_params()
    name = single["device"]
    print(
        f"\ndevice: {name} ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, {args.threads} thread(s) per rank, {mp.cpu_count()} cores"
    )
    print(
        f"model: GPT {params:,} parameters; per rank {args.batch} x {args.seq_len} tokens x "
        f"grad_accum {args.grad_accum}; {args.blocks} blocks of {args.steps} steps per loop"
    )
    print("\n| island | ours tokens/s | plain tokens/s | ours / plain (median of pairs) |")
    print("| --- | --- | --- | --- |")
    print(f"| 1 rank, none | {single['tokens_per_s']:,.0f} | | |")
    for parallel, ours, plain, ratio, _ in rows:
        print(f"| {args.ranks} ranks, {parallel} | {ours:,.0f} | {plain:,.0f} | {ratio:.3f} |")
    print(
        "\n| island | peak RSS per rank (MiB) | peak above base | held above base (after a "
        "step) | vs one rank (held) | parameters + AdamW state (MiB, exact) | vs one rank |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(memory_row("1 rank, none", single, single))
    for parallel, _, _, _, ranks in rows:
        for r, rank in enumerate(ranks):
            print(memory_row(f"{args.ranks} ranks, {parallel}, rank {r}", rank, single))


def memory_row(name: str, rank: dict[str, Any], single: dict[str, Any]) -> str:
    """One row of the memory table, relative to the one-rank island `single`."""
    held, one_held = rank["held_mib"] - rank["base_mib"], single["held_mib"] - single["base_mib"]
    return (
        f"| {name} | {rank['peak_mib']:.0f} | {rank['peak_mib'] - rank['base_mib']:.0f} | "
        f"{held:.0f} | {held / one_held:.2f} | {rank['state_mib']:.1f} | "
        f"{rank['state_mib'] / single['state_mib']:.2f} |"
    )


if __name__ == "__main__":
    main()
