"""The inner loop's CPU AdamW step: ChunkedAdamW against torch.optim.AdamW in the same run.

`ChunkedAdamW` (diloco/inner/chunked_adamw.py) hands torch's own single-tensor update each
large parameter as slices of `CHUNK_NUMEL` values; torch's forms two temporaries of each
parameter's size in every step. For each model shape (total values, tensors) and thread
count: the time of one step (median of --reps after a warm-up step, the two optimizers
alternating), the largest tensor one step allocates (torch's profiler), and whether the two
end with the same bits (they must).

    python bench/chunked_adamw.py [--numel 64e6] [--tensors 1 16] [--threads 1 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from diloco.inner.chunked_adamw import ChunkedAdamW

MIB = 1 << 20
OPTIMIZERS: dict[str, type[torch.optim.AdamW]] = {
    "torch": torch.optim.AdamW,
    "chunked": ChunkedAdamW,
}


def model(numel: int, tensors: int) -> list[torch.nn.Parameter]:
    """`numel` values in `tensors` parameters, with seeded gradients."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for index in range(tensors):
        size = numel // tensors + (index < numel % tensors)
        param = torch.nn.Parameter(torch.randn(size, generator=generator))
        param.grad = torch.randn(size, generator=generator)
        params.append(param)
    return params


def largest_allocation(optimizer: torch.optim.Optimizer) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        optimizer.step()
    return max(event.self_cpu_memory_usage for event in recorded.events())


def measure(numel: int, tensors: int, reps: int) -> dict[str, tuple[float, int]]:
    """optimizer -> (median seconds a step, largest allocation in bytes); checks the bits."""
    params = {name: model(numel, tensors) for name in OPTIMIZERS}
    optimizers = {name: make(params[name], lr=1e-3) for name, make in OPTIMIZERS.items()}
    for optimizer in optimizers.values():
        optimizer.step()  # the moments' first allocation
    seconds: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    for _ in range(reps):
        for name, optimizer in optimizers.items():
            started = time.perf_counter()
            optimizer.step()
            seconds[name].append(time.perf_counter() - started)
    largest = {name: largest_allocation(optimizer) for name, optimizer in optimizers.items()}
    for mine, theirs in zip(params["chunked"], params["torch"], strict=True):
        if not torch.equal(mine, theirs):
            raise SystemExit("ChunkedAdamW and torch.optim.AdamW disagree: a bug")
    return {name: (statistics.median(seconds[name]), largest[name]) for name in OPTIMIZERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=float, default=64e6)
    parser.add_argument("--tensors", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    numel = int(args.numel)
    print(
        f"# one AdamW step, {numel / 1e6:.0f}M fp32 values; {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    )
    print()
    print(
        "| tensors | threads | torch s | chunked s | chunked / torch | "
        "torch's largest temporary MiB | chunked's MiB | same bits |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for tensors in args.tensors:
        for threads in args.threads:
            torch.set_num_threads(threads)
            figures = measure(numel, tensors, args.reps)
            (plain, plain_bytes), (chunked, chunked_bytes) = figures["torch"], figures["chunked"]
            print(
                f"| {tensors} | {threads} | {plain:.3f} | {chunked:.3f} | {chunked / plain:.2f}x "
                f"| {plain_bytes / MIB:.0f} | {chunked_bytes / MIB:.0f} | yes |",
                flush=True,
            )


if __name__ == "__main__":
    main()
