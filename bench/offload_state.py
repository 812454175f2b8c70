"""What outer.offload_state costs an island per round: its outer step with the momentum in a
file (diloco/offload.py) next to the same step in memory and a memcpy, in one run.

One island alone (`OuterSync` over the local transport, codec none, Nesterov SGD: the paper's
outer step), a model of `--sizes` fp32 parameters in one tensor; each round moves the
parameters a little, then syncs. The sync's time is the pseudo-gradient, the (trivial)
average, the outer step and the parameters' write-back; with the state on disk the step also
reads each 16 MiB slice of the momentum from its file and writes it back (msync) before
dropping it from memory and from the page cache, so the next round reads it from the disk
again. Median of --reps rounds after a warm-up; the folder is a temporary directory (pass
--folder to measure another disk).

    OMP_NUM_THREADS=1 python bench/offload_state.py [--sizes 16e6 64e6] [--reps 5] [--folder DIR]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diloco.codecs import NoneCodec
from diloco.outer import OuterHyperparams, OuterSync, SgdOuter
from diloco.transports import LocalGroup


def _sync_seconds(numel: int, reps: int, folder: Path | None) -> float:
    group = LocalGroup(1, NoneCodec(), numel, timeout_s=60.0)
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(numel))])
    outer = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
    sync = OuterSync(
        params.parameters(), group.transport(0), NoneCodec(), outer, OuterHyperparams(), folder
    )
    step = torch.full((numel,), 1e-3)
    times = []
    for _ in range(reps + 1):  # the first round is a warm-up
        with torch.no_grad():
            params[0].add_(step)
        start = time.perf_counter()
        sync.sync(1.0)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _memcpy_seconds(numel: int, reps: int) -> float:
    source, target = torch.ones(numel), torch.empty(numel)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[16e6, 64e6])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# one island's sync, {platform.processor() or platform.machine()}, 1 torch thread")
    print()
    print(
        "| parameters | memcpy of the vector s | sync, state in memory s | sync, state on disk s "
        "| on disk / in memory |"
    )
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes:
        numel = int(size)
        with tempfile.TemporaryDirectory(dir=args.folder) as folder:
            in_memory = _sync_seconds(numel, args.reps, None)
            on_disk = _sync_seconds(numel, args.reps, Path(folder) / "outer-state")
        memcpy = _memcpy_seconds(numel, args.reps)
        print(
            f"| {numel / 1e6:.0f}M | {memcpy:.3f} | {in_memory:.3f} | {on_disk:.3f} "
            f"| {on_disk / in_memory:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
