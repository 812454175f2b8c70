"""Codec speed and error, each next to a plain memcpy of the same buffer in the same run.

For each size (random normal fp32): wire bytes per fp32 byte, relative error |x^ - x| / |x|,
encode and decode time (median of the repetitions after a warm-up), GB/s (fp32 bytes / time),
and the ratio to a memcpy (`dst.copy_(x)` into a preallocated tensor) timed right before each
repetition: the median of those per-repetition ratios, so that other load on the machine
cancels out. Rows:
  memcpy               the baseline itself
  codec <name>         build_codec(name).encode / .decode as registered, end to end: header,
                       checks, allocating the payload and the decoded tensor; on the CPU int8
                       and fp4 run the fused kernels (diloco/codecs/cpu_kernels.py)
  ... kernels only     those kernels into preallocated buffers (CPU): the codec's floor
  ... torch ops        the plain-torch reference functions (int8.py, fp4.py) without a header:
                       the GPU path, and the CPU path before the kernels (or without numba)
A row whose warm-up call takes over a second (the torch references, topk at 124M) is timed
--slow-reps times instead of --reps; the table says how many.

With --loopback SIZES a second table times one exchange between 2 islands on this machine through
the torch transport (bench/loopback.py `measure_exchange`: encode, one broadcast per island,
decode both, fp32 mean) against a plain fp32 gloo all_reduce of the same tensor.

    python bench/codecs.py [--sizes 25e6 124e6] [--codecs int8 fp4 ...] [--no-reference-rows]
                           [--reps 7] [--slow-reps 3] [--block 256] [--threads 0]
                           [--device cpu|cuda] [--loopback 25e6]

On a GPU (--device cuda) times come from CUDA events around each call, after a synchronize.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from loopback import CODECS, print_exchange_table

from diloco.codecs import E2M1, build_codec
from diloco.codecs import cpu_kernels as kernels
from diloco.codecs.fp4 import Fp4Format, fp4_decode, fp4_encode
from diloco.codecs.int8 import int8_decode, int8_encode

SLOW_S = 1.0


@dataclass(frozen=True)
class Case:
    name: str
    wire_bytes: int
    encode: Callable[[], object]
    decode: Callable[[], torch.Tensor]
    """Returns x^; runs after `encode`, whose output it reads."""


@dataclass(frozen=True)
class Timing:
    seconds: float
    vs_memcpy: float
    reps: int


@dataclass(frozen=True)
class Row:
    """What is kept of a measured Case (whose buffers are freed before the next row)."""

    name: str
    wire_bytes: int
    error: float
    encode: Timing
    decode: Timing


def case_makers(
    x: torch.Tensor, codecs: list[str], block: int, topk_fraction: float, references: bool
) -> list[Callable[[], Case]]:
    """One maker per row, so that each row's buffers exist only while it is timed."""
    makers: list[Callable[[], Case]] = [
        functools.partial(codec_case, name, x, block, topk_fraction) for name in codecs
    ]
    if not references:
        return makers
    if x.device.type == "cpu" and kernels.available():
        makers += [lambda: int8_kernel_case(x, block), lambda: fp4_kernel_case(x, block, E2M1)]
    makers += [lambda: int8_torch_case(x, block), lambda: fp4_torch_case(x, block, E2M1)]
    return makers


def codec_case(name: str, x: torch.Tensor, block: int, topk_fraction: float) -> Case:
    codec = build_codec(name, block_size=block, topk_fraction=topk_fraction)
    held: dict[str, torch.Tensor] = {}

    def encode() -> None:
        held.pop("payload", None)  # free the last payload first, as a caller would
        held["payload"] = codec.encode(x)

    label = {"fp4": f"fp4 ({E2M1.name})", "topk": f"topk ({topk_fraction:g})"}.get(name, name)
    return Case(
        f"codec {label}",
        codec.payload_bytes(x.numel()),
        encode,
        lambda: codec.decode(held["payload"], x.numel()),
    )


def int8_kernel_case(x: torch.Tensor, block: int) -> Case:
    numel, nb = x.numel(), -(-x.numel() // block)
    q, scale, out = torch.empty(numel, dtype=torch.int8), torch.empty(nb), torch.empty_like(x)

    def decode() -> torch.Tensor:
        kernels.int8_decode_into(q, scale, out, block)
        return out

    return Case(
        "int8 kernels only",
        numel + 4 * nb,
        lambda: kernels.int8_encode_into(x, q, scale, block),
        decode,
    )


def fp4_kernel_case(x: torch.Tensor, block: int, fmt: Fp4Format) -> Case:
    numel, nb = x.numel(), -(-x.numel() // block)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8)
    scale, out = torch.empty(nb), torch.empty_like(x)

    def decode() -> torch.Tensor:
        kernels.fp4_decode_into(packed, scale, out, block, fmt.magnitudes)
        return out

    return Case(
        f"{fmt.name} kernels only",
        (numel + 1) // 2 + 4 * nb,
        lambda: kernels.fp4_encode_into(x, packed, scale, block, fmt.magnitudes),
        decode,
    )


def int8_torch_case(x: torch.Tensor, block: int) -> Case:
    held: dict[str, torch.Tensor] = {}

    def encode() -> None:
        held.clear()
        held["q"], held["scale"] = int8_encode(x, block)

    return Case(
        "int8 torch ops (before)",
        x.numel() + 4 * blocks(x, block),
        encode,
        lambda: int8_decode(held["q"], held["scale"], block),
    )


def fp4_torch_case(x: torch.Tensor, block: int, fmt: Fp4Format) -> Case:
    held: dict[str, torch.Tensor] = {}

    def encode() -> None:
        held.clear()
        held["packed"], held["scale"] = fp4_encode(x, block, fmt)

    return Case(
        f"{fmt.name} torch ops (before)",
        (x.numel() + 1) // 2 + 4 * blocks(x, block),
        encode,
        lambda: fp4_decode(held["packed"], held["scale"], x.numel(), block, fmt),
    )


def blocks(x: torch.Tensor, block: int) -> int:
    return -(-x.numel() // block)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def time_against(
    fn: Callable[[], object],
    memcpy: Callable[[], object],
    device: torch.device,
    reps: int,
    slow_reps: int,
) -> Timing:
    first = seconds(fn, device)  # warm-up (and the kernels' first call)
    reps = slow_reps if first > SLOW_S else reps
    times, ratios = [], []
    for _ in range(reps):
        base = seconds(memcpy, device)
        took = seconds(fn, device)
        times.append(took)
        ratios.append(took / base)
    return Timing(statistics.median(times), statistics.median(ratios), reps)


def relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    diff = torch.linalg.vector_norm(x_hat - x, dtype=torch.float64)
    return float(diff / torch.linalg.vector_norm(x, dtype=torch.float64))


def machine(device: torch.device) -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    numba = f"numba {kernels.numba.__version__}" if kernels.available() else "no numba"
    gpu = f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"{model}, {torch.get_num_threads()} torch threads on {len(os.sched_getaffinity(0))} "
        f"cores, torch {torch.__version__}, {numba}{gpu}"
    )


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def measure(
    x: torch.Tensor,
    maker: Callable[[], Case],
    memcpy: Callable[[], object],
    args: argparse.Namespace,
) -> Row:
    case = maker()
    enc = time_against(case.encode, memcpy, x.device, args.reps, args.slow_reps)
    dec = time_against(case.decode, memcpy, x.device, args.reps, args.slow_reps)
    return Row(case.name, case.wire_bytes, relative_error(case.decode(), x), enc, dec)


def table(numel: int, memcpy_s: float, rows: list[Row]) -> None:
    gb = 4 * numel / 1e9
    print(
        f"\n{numel / 1e6:.0f}M fp32 elements ({4 * numel / 1e6:.0f} MB), memcpy "
        f"{memcpy_s * 1e3:.1f} ms ({gb / memcpy_s:.1f} GB/s); {load()}\n"
    )
    print(
        "| row | wire / fp32 | rel. error | encode ms | GB/s | / memcpy "
        "| decode ms | GB/s | / memcpy | reps |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        enc, dec = row.encode, row.decode
        reps = str(enc.reps) if enc.reps == dec.reps else f"{enc.reps} / {dec.reps}"
        print(
            f"| {row.name} | {row.wire_bytes / (4 * numel):.4f} | {row.error:.2e} "
            f"| {enc.seconds * 1e3:.1f} | {gb / enc.seconds:.1f} | {enc.vs_memcpy:.2f}x "
            f"| {dec.seconds * 1e3:.1f} | {gb / dec.seconds:.1f} | {dec.vs_memcpy:.2f}x "
            f"| {reps} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[25e6, 124e6])
    parser.add_argument("--codecs", nargs="+", default=CODECS, choices=CODECS)
    parser.add_argument(
        "--no-reference-rows", action="store_true", help="only the codec rows (and memcpy)"
    )
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--slow-reps", type=int, default=3)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--topk-fraction", type=float, default=0.1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument(
        "--loopback", type=float, nargs="+", default=[], help="sizes of the 2-process table"
    )
    parser.add_argument("--loopback-reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{machine(device)}; {load()}")
    for size in args.sizes:
        numel = int(size)
        x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
        dst = torch.empty_like(x)
        memcpy = functools.partial(dst.copy_, x)
        memcpy_s = statistics.median(seconds(memcpy, device) for _ in range(args.reps))
        rows = []
        for maker in case_makers(
            x, args.codecs, args.block, args.topk_fraction, not args.no_reference_rows
        ):
            rows.append(measure(x, maker, memcpy, args))
            gc.collect()  # the row's buffers go before the next row's
        table(numel, memcpy_s, rows)
        del x, dst
        gc.collect()
    for size in args.loopback:
        print_exchange_table(int(size), args.codecs, args.block, args.loopback_reps)


if __name__ == "__main__":
    main()
