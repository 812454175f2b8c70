"""Codec speed and error on this machine's CPU, each next to a plain memcpy of the same buffer.

For each size (random normal fp32): wire bytes per fp32 byte, relative error |x^ - x| / |x|,
encode and decode time (median of --reps after a warm-up), GB/s (fp32 bytes / time), and the
ratio to a memcpy (`dst.copy_(x)` into a preallocated tensor) timed right before each
repetition: the median of those per-repetition ratios, so that other load on the machine
cancels out. Rows:
  memcpy               the baseline itself
  fp16 / bf16 cast     a cast into a preallocated tensor, and back
  ... torch ops        the plain-torch references (diloco/codecs/int8.py, fp4.py)
  ... fused (numba)    diloco/codecs/cpu_kernels.py, into preallocated buffers
  codec ...            Codec.encode / decode as registered (header, checks and copies included)
With --loopback a second table adds gloo between 2 local processes (bench/loopback.py): what one
exchange between 2 islands costs (encode, gather both payloads, decode both) against one fp32
all_reduce.

    python bench/codecs.py [--sizes 25e6 124e6] [--reps 7] [--block 256] [--threads 0]
                           [--loopback]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from loopback import measure_loopback

from diloco.codecs import E2M1, E3M0, build_codec
from diloco.codecs import cpu_kernels as kernels
from diloco.codecs.fp4 import Fp4Format, fp4_decode, fp4_encode
from diloco.codecs.int8 import int8_decode, int8_encode


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


def cases(x: torch.Tensor, block: int) -> list[Case]:
    out, dst = torch.empty_like(x), torch.empty_like(x)
    found = [
        Case("memcpy (fp32 copy_)", 4 * x.numel(), lambda: dst.copy_(x), lambda: out.copy_(dst))
    ]
    for dtype, name in [(torch.float16, "fp16"), (torch.bfloat16, "bf16")]:
        half = torch.empty(x.numel(), dtype=dtype)
        found.append(
            Case(
                f"{name} cast",
                2 * x.numel(),
                lambda h=half: h.copy_(x),
                lambda h=half: out.copy_(h),
            )
        )
    found += int8_cases(x, out, block)
    found += fp4_cases(x, out, block, E2M1, with_torch_ops=True)
    found += fp4_cases(x, out, block, E3M0, with_torch_ops=False)
    found += [codec_case(name, x, block) for name in ["int8", "fp4_e2m1"]]
    return found


def int8_cases(x: torch.Tensor, out: torch.Tensor, block: int) -> list[Case]:
    numel, nb = x.numel(), -(-x.numel() // block)
    held: dict[str, torch.Tensor] = {}

    def torch_encode() -> None:
        held["q"], held["scale"] = int8_encode(x, block)

    q, scale = torch.empty(numel, dtype=torch.int8), torch.empty(nb)

    def fused_decode() -> torch.Tensor:
        kernels.int8_decode_into(q, scale, out, block)
        return out

    wire = numel + 4 * nb
    return [
        Case(
            "int8 torch ops",
            wire,
            torch_encode,
            lambda: int8_decode(held["q"], held["scale"], block),
        ),
        Case(
            "int8 fused (numba)",
            wire,
            lambda: kernels.int8_encode_into(x, q, scale, block),
            fused_decode,
        ),
    ]


def fp4_cases(
    x: torch.Tensor, out: torch.Tensor, block: int, fmt: Fp4Format, with_torch_ops: bool
) -> list[Case]:
    numel, nb = x.numel(), -(-x.numel() // block)
    held: dict[str, torch.Tensor] = {}

    def torch_encode() -> None:
        held["packed"], held["scale"] = fp4_encode(x, block, fmt)

    def torch_decode() -> torch.Tensor:
        return fp4_decode(held["packed"], held["scale"], numel, block, fmt)

    packed, scale = torch.empty((numel + 1) // 2, dtype=torch.uint8), torch.empty(nb)

    def fused_decode() -> torch.Tensor:
        kernels.fp4_decode_into(packed, scale, out, block, fmt.magnitudes)
        return out

    wire = (numel + 1) // 2 + 4 * nb
    fused = Case(
        f"{fmt.name} fused (numba)",
        wire,
        lambda: kernels.fp4_encode_into(x, packed, scale, block, fmt.magnitudes),
        fused_decode,
    )
    if not with_torch_ops:
        return [fused]
    return [Case(f"{fmt.name} torch ops", wire, torch_encode, torch_decode), fused]


def codec_case(name: str, x: torch.Tensor, block: int) -> Case:
    codec = build_codec(name, block_size=block)
    held: dict[str, torch.Tensor] = {}

    def encode() -> None:
        held["payload"] = codec.encode(x)

    return Case(
        f"codec {name}",
        codec.payload_bytes(x.numel()),
        encode,
        lambda: codec.decode(held["payload"], x.numel()),
    )


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_against(fn: Callable[[], object], memcpy: Callable[[], object], reps: int) -> Timing:
    fn()  # warm-up (and the JIT's first call)
    times, ratios = [], []
    for _ in range(reps):
        base = seconds(memcpy)
        took = seconds(fn)
        times.append(took)
        ratios.append(took / base)
    return Timing(statistics.median(times), statistics.median(ratios))


def relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    diff = torch.linalg.vector_norm(x_hat - x, dtype=torch.float64)
    return float(diff / torch.linalg.vector_norm(x, dtype=torch.float64))


def first_calls() -> str:
    """Seconds of each fused kernel's first call in this process: a JIT compile, or a load
    from numba's on-disk cache when an earlier process compiled it."""
    x = torch.randn(1000)
    q, s = torch.empty(1000, dtype=torch.int8), torch.empty(4)
    p, o = torch.empty(500, dtype=torch.uint8), torch.empty(1000)
    calls = {
        "int8 encode": lambda: kernels.int8_encode_into(x, q, s, 256),
        "int8 decode": lambda: kernels.int8_decode_into(q, s, o, 256),
        "fp4 encode": lambda: kernels.fp4_encode_into(x, p, s, 256, E2M1.magnitudes),
        "fp4 decode": lambda: kernels.fp4_decode_into(p, s, o, 256, E2M1.magnitudes),
    }
    return ", ".join(f"{name} {seconds(call):.2f} s" for name, call in calls.items())


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    numba = kernels.numba
    return (
        f"{model}, {torch.get_num_threads()} torch threads on {len(os.sched_getaffinity(0))} "
        f"cores, torch {torch.__version__}, numba {numba.__version__}"
    )


def table(numel: int, rows: list[tuple[Case, float, Timing, Timing]]) -> None:
    gb = 4 * numel / 1e9
    print(f"\n{numel / 1e6:.0f}M fp32 elements ({4 * numel / 1e6:.0f} MB)\n")
    print(
        "| codec | wire / fp32 | rel. error | encode ms | GB/s | / memcpy "
        "| decode ms | GB/s | / memcpy |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, error, enc, dec in rows:
        print(
            f"| {case.name} | {case.wire_bytes / (4 * numel):.4f} | {error:.2e} "
            f"| {enc.seconds * 1e3:.1f} | {gb / enc.seconds:.1f} | {enc.vs_memcpy:.2f}x "
            f"| {dec.seconds * 1e3:.1f} | {gb / dec.seconds:.1f} | {dec.vs_memcpy:.2f}x |"
        )


def exchange_table(rows: list[tuple[Case, float, Timing, Timing]], numel: int, reps: int) -> None:
    """One exchange between 2 islands: encode, gather both payloads, decode both."""
    wires = {case.wire_bytes for case, *_ in rows[1:]}
    sent = measure_loopback(numel, {str(w): w for w in wires}, reps)
    fp32 = sent["fp32 all_reduce"]
    print(f"\ngloo, 2 processes on loopback: fp32 all_reduce {fp32 * 1e3:.0f} ms\n")
    print("| codec | send: all_gather / broadcasts ms | exchange ms | / fp32 all_reduce |")
    print("| --- | --- | --- | --- |")
    for case, _, enc, dec in rows[1:]:
        gather, bcast = sent[f"{case.wire_bytes} all_gather"], sent[f"{case.wire_bytes} broadcasts"]
        totals = [enc.seconds + send + 2 * dec.seconds for send in (gather, bcast)]
        print(
            f"| {case.name} | {gather * 1e3:.0f} / {bcast * 1e3:.0f} "
            f"| {totals[0] * 1e3:.0f} / {totals[1] * 1e3:.0f} "
            f"| {totals[0] / fp32:.2f}x / {totals[1] / fp32:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[25e6, 124e6])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--loopback", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("bench/codecs.py needs numba for the fused rows: pip install numba")
    compiled = first_calls()
    print(f"{machine()}; median of {args.reps}")
    print(f"fused kernels, first call: {compiled}")
    for size in args.sizes:
        numel = int(size)
        x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        found = cases(x, args.block)
        memcpy = found[0].encode
        rows = []
        for case in found:
            enc = time_against(case.encode, memcpy, args.reps)
            dec = time_against(case.decode, memcpy, args.reps)
            rows.append((case, relative_error(case.decode(), x), enc, dec))
        table(numel, rows)
        if args.loopback:
            exchange_table(rows, numel, max(3, args.reps // 2))
        del x, found, rows


if __name__ == "__main__":
    main()
