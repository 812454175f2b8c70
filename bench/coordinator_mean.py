"""The coordinator's arithmetic of one round, next to torch's and a memcpy in the same run.

The data plane's coordinator forms the round's weighted mean chunk by chunk from the islands'
payloads and encodes it into the mean's payload (`ChunkCodec.mean_chunk`, as
`LockstepAccumulator` calls it, in its chunks). For each codec (int8, none), size and island
count, on payloads already in memory (no sockets: the arithmetic alone), one thread:

  one-pass       mean_chunk as the coordinator runs it: every island's chunk summed in one
                 pass (sum_kernels), for int8 encoded as the sums are formed
  one at a time  the same chunks added one island at a time: each island's chunk decoded (the
                 codec's CPU kernel; none: a view), torch's zero_() then add_(values, alpha=w)
                 per island, a pass checking the sums are finite (none), then the mean's chunk
                 encoded (int8): the path taken where the one-pass sums do not run (no numba,
                 or a torch whose add is not one fused multiply-add), and the way every chunk
                 was summed before
  memcpy         copying the islands' fp32 vectors once (N x 4 bytes an element): a floor

Both paths give the same bytes (checked here on every run, and by the unit tests). Median of
--reps after a warm-up.

    OMP_NUM_THREADS=1 python bench/coordinator_mean.py [--codecs int8 none] [--sizes 25e6 124e6]
                                                       [--islands 2 4] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from diloco.codecs import build_codec, sum_kernels
from diloco.codecs.base import all_finite
from diloco.transports.dataplane.accumulate import LockstepAccumulator
from diloco.transports.dataplane.codec_chunks import ChunkCodec, new_payload


def payloads(codec_name: str, numel: int, count: int) -> list[torch.Tensor]:
    codec, generator = build_codec(codec_name), torch.Generator().manual_seed(0)
    return [codec.encode(torch.randn(numel, generator=generator) * 1e-3) for _ in range(count)]


def round_mean(chunked: ChunkCodec, wires: list[torch.Tensor], chunk: int) -> torch.Tensor:
    """The mean's payload, built chunk by chunk as the coordinator builds it."""
    numel, count = chunked.numel, len(wires)
    prefixes = [wire[: chunked.prefix_bytes] for wire in wires]
    alphas = [1.0 / count] * count
    payload = new_payload(chunked)
    scratch_n, acc_n = torch.empty(chunk), torch.empty(chunk)
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        begin, end = chunked.section_offset(start), chunked.section_offset(stop)
        sections = [
            wire[chunked.prefix_bytes + begin : chunked.prefix_bytes + end] for wire in wires
        ]
        # As LockstepAccumulator: an fp32 mean is summed in the payload itself, checked finite
        # (by the one-pass sums' flag, else a pass), and needs no encoding.
        target_n = chunked.verbatim_view(payload, start, stop)
        sums_n = acc_n[: stop - start] if target_n is None else target_n
        finite = chunked.mean_chunk(
            prefixes, sections, start, alphas, sums_n, scratch_n=scratch_n[: stop - start],
            encode_into=None if target_n is not None else payload,
        )  # fmt: skip
        if target_n is not None and finite is None:
            all_finite(sums_n)
    return payload


def median_s(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", nargs="+", default=["int8", "none"])
    parser.add_argument("--sizes", nargs="+", type=float, default=[25e6, 124e6])
    parser.add_argument("--islands", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not sum_kernels.fma_add_matches_torch():
        raise SystemExit("no one-pass sums here (numba missing, or torch's add differs)")
    print(f"# coordinator mean, in memory; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, 1 thread; median of {args.reps}\n")  # fmt: skip
    print("| codec | elements | islands | one-pass s | one at a time s | one at a time / one-pass "
          "| memcpy s | one-pass / memcpy |")  # fmt: skip
    print("| --- " * 8 + "|")
    for codec_name in args.codecs:
        for numel in map(int, args.sizes):
            for count in args.islands:
                print_row(codec_name, numel, count, args.reps)


def print_row(codec_name: str, numel: int, count: int, reps: int) -> None:
    memcpy_s = memcpy_seconds(numel, count, reps)
    one_pass_s, one_at_a_time_s = mean_seconds(codec_name, numel, count, reps)
    print(
        f"| {codec_name} | {numel / 1e6:g}M | {count} | {one_pass_s:.3f} | "
        f"{one_at_a_time_s:.3f} | {one_at_a_time_s / one_pass_s:.2f}x | {memcpy_s:.3f} | "
        f"{one_pass_s / memcpy_s:.2f}x |",
        flush=True,
    )


def memcpy_seconds(numel: int, count: int, reps: int) -> float:
    sources = [torch.randn(numel) for _ in range(count)]
    copies = [torch.empty(numel) for _ in range(count)]

    def copy_all() -> None:
        for copy, source in zip(copies, sources, strict=True):
            copy.copy_(source)

    return median_s(copy_all, reps)


def mean_seconds(codec_name: str, numel: int, count: int, reps: int) -> tuple[float, float]:
    """Seconds of the one-pass mean and of the one-island-at-a-time mean (same bytes out), in
    the coordinator's chunks."""
    wires = payloads(codec_name, numel, count)
    accumulator = LockstepAccumulator(build_codec(codec_name), numel)
    chunked, chunk = accumulator.chunked, accumulator.chunk_elements

    def run() -> torch.Tensor:
        return round_mean(chunked, wires, chunk)

    one_pass, one_pass_s = run(), median_s(run, reps)
    sum_kernels._MATCHES_TORCH[:] = [False]  # as where the one-pass sums do not run
    try:
        one_at_a_time, one_at_a_time_s = run(), median_s(run, reps)
    finally:
        sum_kernels._MATCHES_TORCH[:] = [True]
    if not torch.equal(one_pass, one_at_a_time):
        raise SystemExit("the two paths differ")
    return one_pass_s, one_at_a_time_s


if __name__ == "__main__":
    main()
