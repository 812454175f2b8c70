"""What moving a pseudo-gradient between 2 processes over loopback costs, with gloo.

The torch transport (diloco/transports/torch_distributed.py) sums fp32 payloads with
`all_reduce` and gathers every other codec's payload with one `broadcast` per rank. Two
measurements, each in 2 spawned processes (one torch thread each, as 2 islands sharing 2 cores)
joined through a TCPStore the parent owns (port 0: the OS picks a free one):

- `measure_loopback`: the bare collectives (fp32 all_reduce; all_gather against one broadcast
  per rank for a byte payload), the reason the transport broadcasts;
- `measure_exchange`: one whole exchange per codec through the transport itself, as an island
  runs it: `codec.encode` + `TorchDistributedTransport.average` (weights, the broadcasts,
  decoding both payloads, the fp32 mean), against a plain fp32 all_reduce of the same tensor
  timed right before each repetition (the median of the per-repetition ratios).

Median of `--reps` after one warm-up, barrier before each.

    python bench/loopback.py [--sizes 25e6 124e6] [--reps 5] [--codecs int8 fp4 ...]
                             [--no-exchange]

bench/codecs.py --loopback SIZES prints the same exchange table after its own.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diloco.aggregate import weighted_mean
from diloco.codecs import Codec, build_codec
from diloco.transports.torch_distributed import TorchDistributedTransport

JOIN_S = 1200.0
CODECS = ["none", "fp16", "bf16", "int8", "fp8", "fp4", "fp4_e3m0", "topk"]


def _worker(
    rank: int, port: int, numel: int, gathers: Mapping[str, int], reps: int, results: mp.Queue
) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        times: dict[str, float] = {}
        x = torch.randn(numel)
        times["fp32 all_reduce"] = _median_s(lambda: dist.all_reduce(x), reps)
        for name, nbytes in gathers.items():
            out = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8) for _ in range(2)]
            times[f"{name} all_gather"] = _median_s(
                lambda: dist.all_gather(out, out[rank]),  # noqa: B023
                reps,
            )
            times[f"{name} broadcasts"] = _median_s(
                lambda: [dist.broadcast(out[src], src) for src in range(2)],  # noqa: B023
                reps,
            )
        if rank == 0:
            results.put(times)
    finally:
        dist.destroy_process_group()


def _median_s(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up: connections, buffers
    seconds = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_loopback(numel: int, gathers: Mapping[str, int], reps: int) -> dict[str, float]:
    """Median seconds, between 2 local processes, of a fp32 all_reduce of `numel` floats
    ("fp32 all_reduce") and of gathering `gathers[name]` bytes from each process, with
    all_gather ("{name} all_gather") and with one broadcast per process ("{name} broadcasts")."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(rank, store.port, numel, dict(gathers), reps, results))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        times: dict[str, float] = results.get(timeout=JOIN_S)
    finally:
        for proc in procs:
            proc.join(JOIN_S)
            if proc.is_alive():
                proc.kill()
    return times


def _exchange_worker(
    rank: int, port: int, numel: int, codecs: list[str], block: int, reps: int, results: mp.Queue
) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        fp32 = x.clone()
        # plain tuples through the queue: a class defined in a script run as __main__ does not
        # unpickle in the parent
        times: dict[str, tuple[float, ...]] = {}
        for name in codecs:
            codec = build_codec(name, block_size=block)
            transport = TorchDistributedTransport(codec, numel, rank=rank, num_islands=2)
            # round 0 is a warm-up (connections, buffers, the kernels' first call)
            steps = [_exchange(codec, transport, x, fp32, round) for round in range(reps + 1)][1:]
            times[name] = (
                *(statistics.median(column) for column in zip(*steps, strict=True)),
                statistics.median(s[1] / s[0] for s in steps),
            )
            transport.close()  # leaves the group alone: it did not create it
        if rank == 0:
            results.put(times)
    finally:
        dist.destroy_process_group()


def _exchange(
    codec: Codec,
    transport: TorchDistributedTransport,
    x: torch.Tensor,
    fp32: torch.Tensor,
    round: int,
) -> tuple[float, ...]:
    """Seconds of the fields of `Exchange` but the ratio, each part started together.

    The parts repeat, step by step, what `average` does with a compressed payload (`none`
    all-reduces instead: no parts)."""
    dist.barrier()
    start = time.perf_counter()
    dist.all_reduce(fp32)
    dist.barrier()
    middle = time.perf_counter()
    payload = codec.encode(x)
    encoded = time.perf_counter()
    transport.average(payload, 1.0, round)
    done = time.perf_counter()
    if codec.name == "none":
        return middle - start, done - middle, encoded - middle, math.nan, math.nan, math.nan
    dist.barrier()
    parts = [time.perf_counter()]
    gathered = transport._gather(payload)
    parts.append(time.perf_counter())
    decoded = [codec.decode(p, x.numel()) for p in gathered]
    parts.append(time.perf_counter())
    weighted_mean(decoded, [1.0] * len(decoded))
    parts.append(time.perf_counter())
    gather_s, decode_s, mean_s = (b - a for a, b in itertools.pairwise(parts))
    return middle - start, done - middle, encoded - middle, gather_s, decode_s, mean_s


@dataclass(frozen=True)
class Exchange:
    """Rank 0's medians over the repetitions of one codec's exchange."""

    fp32_all_reduce_s: float
    """The plain fp32 all_reduce of the same tensor, timed before each exchange."""
    seconds: float
    """encode + transport.average."""
    encode_s: float
    gather_s: float
    """The parts of average: one broadcast per island,"""
    decode_s: float
    """decoding both payloads,"""
    mean_s: float
    """and their fp32 mean (measured in a second pass)."""
    vs_all_reduce: float
    """Median of the per-repetition ratios (encode + average) / all_reduce."""


def measure_exchange(numel: int, codecs: list[str], block: int, reps: int) -> dict[str, Exchange]:
    """One exchange between 2 local islands per codec, through TorchDistributedTransport."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_exchange_worker,
            args=(rank, store.port, numel, codecs, block, reps, results),
        )
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        times: dict[str, tuple[float, ...]] = results.get(timeout=JOIN_S)
    finally:
        for proc in procs:
            proc.join(JOIN_S)
            if proc.is_alive():
                proc.kill()
    return {name: Exchange(*row) for name, row in times.items()}


def print_exchange_table(numel: int, codecs: list[str], block: int, reps: int) -> None:
    found = measure_exchange(numel, codecs, block, reps)
    one, five, fifteen = os.getloadavg()
    print(
        f"\ntorch transport, gloo, 2 processes (1 torch thread each) on loopback, "
        f"{numel / 1e6:.0f}M elements, median of {reps}; load average {one:.2f} {five:.2f} "
        f"{fifteen:.2f}\n"
    )
    print(
        "| codec | encode ms | encode + average ms | fp32 all_reduce ms | / all_reduce "
        "| parts: broadcasts / decode both / mean ms |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, got in found.items():
        parts = (
            "(all_reduce)"
            if math.isnan(got.gather_s)
            else " / ".join(f"{s * 1e3:.0f}" for s in (got.gather_s, got.decode_s, got.mean_s))
        )
        print(
            f"| {name} | {got.encode_s * 1e3:.0f} | {got.seconds * 1e3:.0f} "
            f"| {got.fp32_all_reduce_s * 1e3:.0f} | {got.vs_all_reduce:.2f}x | {parts} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[25e6, 124e6])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--codecs", nargs="+", default=CODECS, help="of the exchange table")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--no-exchange", action="store_true", help="only the bare collectives")
    args = parser.parse_args()
    print("| elements | exchange | MB sent per process | median s | GB/s |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes:
        numel = int(size)
        gathers = {"2 bytes/element": 2 * numel, "1 byte/element": numel}
        for name, seconds in measure_loopback(numel, gathers, args.reps).items():
            nbytes = 4 * numel if name.startswith("fp32") else gathers[name.rsplit(" ", 1)[0]]
            print(
                f"| {numel / 1e6:.0f}M | {name} | {nbytes / 1e6:.0f} | {seconds:.3f} "
                f"| {nbytes / seconds / 1e9:.2f} |"
            )
    for size in [] if args.no_exchange else args.sizes:
        print_exchange_table(int(size), args.codecs, args.block, args.reps)


if __name__ == "__main__":
    main()
