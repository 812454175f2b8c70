"""What moving a pseudo-gradient between 2 processes over loopback costs, with gloo.

The torch transport sums fp32 payloads with `all_reduce` and all-gathers the bytes of every
other codec's payload (diloco/transports/torch_distributed.py). This times both on one machine,
and one `broadcast` from each rank in turn, which gathers the same bytes: 2 spawned processes,
one torch thread each, joined through a TCPStore the parent owns (port 0: the OS picks a free
one). Median of `--reps` after one warm-up, barrier before each.

    python bench/loopback.py [--sizes 25e6 124e6] [--reps 5]

bench/codecs.py --loopback puts these times next to the encode and decode times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

JOIN_S = 600.0


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[25e6, 124e6])
    parser.add_argument("--reps", type=int, default=5)
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


if __name__ == "__main__":
    main()
