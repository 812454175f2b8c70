"""Fused CPU kernels for the block codecs (int8, fp4), compiled with numba.

The plain-torch codecs read the fp32 buffer several times (abs, amax, divide, round, clamp,
cast), so on a CPU they run at a tenth of memory bandwidth. These kernels make one pass: per
block they take the absmax while the block sits in L1, then quantize it, with the blocks spread
over the cores. They write into buffers the caller preallocates (CPU torch tensors; their numpy
views share memory) and produce bit for bit what these torch formulas produce:

  int8  scale_b = absmax_b / 127;  q_i = clamp(round_half_even(x_i / scale_b), -127, 127)
        decode x_i = float32(q_i) * scale_b
  fp4   scale_b = absmax_b / top;  code_i = #{k : |x_i| / scale_b > mid_k}  (ties to the lower code)
        nibble_i = 8 * (x_i < 0) | code_i;  element 2j in the low nibble of byte j, 2j+1 the high
        decode x_i = (+-magnitude[code_i]) * scale_b

(top = the largest of the format's 8 magnitudes, mid_k the midpoints between consecutive ones.)
A block whose absmax is 0 gets scale 0 and all-zero codes. The references they match are
int8_encode / int8_decode (int8.py) and fp4_encode / fp4_decode (fp4.py), checked by
tests/unit/test_cpu_kernels.py. Divisions are real fp32 divisions, as torch does
them (not multiplications by a reciprocal), and nothing is compiled with fastmath, so the results
match torch exactly. Two tricks keep the loops vectorizable all the same:
- absmax is an integer max over the float bits with the sign bit cleared: for non-NaN floats the
  bits of |x| order like |x|, and a NaN (bits above +inf) wins, as it does in torch.amax;
- round half to even is `(y + 1.5 * 2**23) - 1.5 * 2**23`, exact for |y| < 2**22 (here <= 127).

A block holding a NaN or an inf gets a non-finite scale (its codes are then meaningless), so a
caller that must refuse non-finite input can check the N / B scales instead of the N values.

The grpc coordinator's weighted sums over many payloads build on these in sum_kernels.py.

`available()` is False when numba is missing: callers then take the torch path. Compiled code is
cached on disk (`cache=True`), so only a machine's first process pays the compile (about 4 s for
the four kernels of even block sizes). Work is split over `torch.get_num_threads()` threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

try:
    import numba
except ImportError:  # numba is optional: the torch codecs work without it
    numba = None  # type: ignore[assignment]

# Below this many values per thread, starting a thread (~0.1 ms) costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 16


def available() -> bool:
    """True when numba is importable, so the fused kernels can run."""
    return numba is not None


def fp4_tables(magnitudes: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The 7 fp32 midpoints between the 8 magnitudes of an fp4 format, and the signed value
    of each of the 16 nibbles (bit 3 = sign)."""
    mags = np.asarray(magnitudes, dtype=np.float64)
    if mags.shape != (8,) or not (np.diff(mags) > 0).all():
        raise ValueError(f"fp4 needs 8 increasing magnitudes, got {list(magnitudes)}")
    mids = ((mags[1:] + mags[:-1]) / 2).astype(np.float32)
    return mids, np.concatenate([mags, -mags]).astype(np.float32)


def int8_encode_into(
    x_N: torch.Tensor, q_N: torch.Tensor, scale_nb: torch.Tensor, block: int
) -> None:
    """Write the int8 codes of fp32 `x_N` into `q_N` and its block scales into `scale_nb`."""
    x = _array(x_N, torch.float32, x_N.numel(), "x_N")
    q = _array(q_N, torch.int8, x.size, "q_N")
    scale = _array(scale_nb, torch.float32, _blocks(x.size, block), "scale_nb")
    _parallel(_int8_encode, scale.size, x.size, x.view(np.uint32), q, scale, block)


def int8_decode_into(
    q_N: torch.Tensor, scale_nb: torch.Tensor, out_N: torch.Tensor, block: int
) -> None:
    """Write the fp32 values of int8 codes `q_N` with block scales `scale_nb` into `out_N`."""
    q = _array(q_N, torch.int8, q_N.numel(), "q_N")
    scale = _array(scale_nb, torch.float32, _blocks(q.size, block), "scale_nb")
    out = _array(out_N, torch.float32, q.size, "out_N")
    _parallel(_int8_decode, scale.size, q.size, q, scale, out, block)


def fp4_encode_into(
    x_N: torch.Tensor,
    packed: torch.Tensor,
    scale_nb: torch.Tensor,
    block: int,
    magnitudes: Sequence[float],
) -> None:
    """Write the fp4 nibbles of fp32 `x_N`, two per byte, into `packed` (uint8, ceil(N / 2))
    and its block scales into `scale_nb`; `magnitudes`: the format's 8 code values."""
    x = _array(x_N, torch.float32, x_N.numel(), "x_N")
    out = _array(packed, torch.uint8, (x.size + 1) // 2, "packed")
    scale = _array(scale_nb, torch.float32, _blocks(x.size, block), "scale_nb")
    mids, table = fp4_tables(magnitudes)
    top = table[7]
    if block % 2 == 0:
        _parallel(
            _fp4_encode_even, scale.size, x.size, x, x.view(np.uint32), out, scale, block, mids, top
        )
    else:  # pairs straddle blocks: scales first, then the codes
        _parallel(_absmax_scales, scale.size, x.size, x.view(np.uint32), scale, block, top)
        _parallel(_fp4_encode_pairs, out.size, x.size, x, out, scale, block, mids)


def fp4_decode_into(
    packed: torch.Tensor,
    scale_nb: torch.Tensor,
    out_N: torch.Tensor,
    block: int,
    magnitudes: Sequence[float],
) -> None:
    """Write the fp32 values of fp4 nibbles `packed` with block scales `scale_nb` into `out_N`."""
    out = _array(out_N, torch.float32, out_N.numel(), "out_N")
    src = _array(packed, torch.uint8, (out.size + 1) // 2, "packed")
    scale = _array(scale_nb, torch.float32, _blocks(out.size, block), "scale_nb")
    table = fp4_tables(magnitudes)[1]
    if block % 2 == 0:
        _parallel(_fp4_decode_even, scale.size, out.size, src, scale, out, block, table)
    else:
        _parallel(_fp4_decode_pairs, src.size, out.size, src, scale, out, block, table)


def _blocks(numel: int, block: int) -> int:
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    return -(-numel // block)


def _array(t: torch.Tensor, dtype: torch.dtype, numel: int, name: str) -> np.ndarray:
    """The flat numpy view (no copy) of a contiguous CPU tensor, checked."""
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(
            f"{name} must be a contiguous CPU {dtype} tensor of {numel} elements, got "
            f"{t.device.type} {t.dtype} of shape {tuple(t.shape)}"
        )
    return t.detach().reshape(-1).numpy()


def _parallel(kernel: Callable[..., Any], items: int, elements: int, *args: object) -> list[Any]:
    """kernel(*args, lo, hi) over [0, items) (blocks or bytes of `elements` values in all),
    split into one contiguous range per torch thread, the calling thread taking the first;
    what each range's call returned, in order.

    Plain Python threads rather than numba's `parallel=True`: its OpenMP layer brings a second
    OpenMP runtime beside torch's, and the two pools' spin-waiting idle threads steal the cores
    from each other (a memcpy right after a kernel ran 4x slower here); its `workqueue` layer
    aborts the process when two threads launch at once. The kernels release the GIL."""
    if numba is None:
        raise RuntimeError("the fused CPU codec kernels need numba (pip install numba)")
    parts = max(1, min(torch.get_num_threads(), items, elements // _MIN_ELEMENTS_PER_THREAD))
    cuts = [items * k // parts for k in range(parts + 1)]
    results: list[Any] = [None] * parts

    def run(k: int) -> None:
        results[k] = kernel(*args, cuts[k], cuts[k + 1])

    helpers = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(1, parts)]
    for helper in helpers:
        helper.start()
    run(0)
    for helper in helpers:
        helper.join()
    return results


if numba is not None:
    from llvmlite import ir
    from numba import njit
    from numba.core import types
    from numba.extending import intrinsic

    _ROUND = np.float32(12582912.0)  # 1.5 * 2**23
    _ABS = np.uint32(0x7FFFFFFF)
    # Indices are unsigned on purpose (bounds, and the constants that index arithmetic uses):
    # numba then skips its negative-index wraparound code, which would stop LLVM from
    # vectorizing the loops (a signed `2 * j` alone turns the loads into gathers).
    _ONE = np.uint64(1)
    _TWO = np.uint64(2)
    _CHUNK = np.uint64(512)  # fp4 elements coded at a time into a scratch buffer (even)

    # nogil: _parallel's threads run at once. error_model="numpy": x / 0 gives inf or NaN as in
    # torch, where numba's default raises ZeroDivisionError and checks every division.
    _kernel = njit(nogil=True, cache=True, error_model="numpy")
    _inline = njit(inline="always", cache=True, error_model="numpy")

    @intrinsic
    def _f32_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]
        """The float32 whose bit pattern is the uint32 `bits`."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def _bits_of_f32(typingctx, x):  # type: ignore[no-untyped-def]
        """The uint32 bit pattern of the float32 `x`."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
        """a * b + c rounded once (llvm.fma.f32: one instruction where the CPU has FMA, and
        vectorized), as torch's vector loops compute `self + alpha * other`."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            f32 = ir.FloatType()
            fma = builder.module.declare_intrinsic(
                "llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32])
            )
            return builder.call(fma, args)

        return types.float32(types.float32, types.float32, types.float32), codegen

    @_inline
    def _int8_code(x, s):  # type: ignore[no-untyped-def]
        """The int8 code of x in a block of scale s > 0 (round half to even, clamped)."""
        r = (x / s + _ROUND) - _ROUND
        return np.int8(np.int32(min(max(r, np.float32(-127.0)), np.float32(127.0))))

    @_inline
    def _absmax(xb, start, stop):  # type: ignore[no-untyped-def]
        """max |x| over xb[start:stop] (the uint32 bits of fp32 x), as a float32."""
        m = np.uint32(0)
        for i in range(start, stop):
            m = max(m, np.uint32(xb[i] & _ABS))
        return _f32_from_bits(m)  # type: ignore[call-arg]

    @_inline
    def _bounds(b, block, n):  # type: ignore[no-untyped-def]
        start = b * block
        return np.uint64(start), np.uint64(min(start + block, n))

    @_kernel
    def _int8_encode(xb, q, scale, block, b0, b1):  # type: ignore[no-untyped-def]
        x = xb.view(np.float32)
        for b in range(b0, b1):
            start, stop = _bounds(b, block, x.shape[0])
            s = _absmax(xb, start, stop) / np.float32(127.0)
            scale[b] = s
            if s == np.float32(0.0):  # x / 0 would be NaN
                for i in range(start, stop):
                    q[i] = 0
                continue
            for i in range(start, stop):
                q[i] = _int8_code(x[i], s)

    @_kernel
    def _int8_decode(q, scale, out, block, b0, b1):  # type: ignore[no-untyped-def]
        for b in range(b0, b1):
            start, stop = _bounds(b, block, q.shape[0])
            s = scale[b]
            for i in range(start, stop):
                out[i] = np.float32(q[i]) * s

    @_inline
    def _fp4_nibble(v, s, mids):  # type: ignore[no-untyped-def]
        """The nibble of value v in a block of scale s, as a float32 (s = 0 gives NaN: code 0).

        Counted in float32 on purpose: numba widens integer sums to 64 bits, which quarters
        the vector width."""
        y = abs(v) / s
        code = np.float32(0.0)
        for k in range(7):
            code += np.float32(y > mids[k])
        return code + np.float32(8.0) * np.float32(v < 0)  # the sign even of a code 0

    @_kernel
    def _fp4_encode_even(x, xb, out, scale, block, mids, top, b0, b1):  # type: ignore[no-untyped-def]
        """Even block size: each block owns whole bytes. Per block: absmax, then per chunk the
        nibbles into a float32 scratch in L1 (a contiguous loop, so 8 lanes wide; coding and
        packing the pairs in one strided loop ran 1.5x slower), then the pairs packed."""
        n = x.shape[0]
        nib = np.empty(_CHUNK + _ONE, np.float32)
        for b in range(b0, b1):
            start, stop = _bounds(b, block, n)
            s = _absmax(xb, start, stop) / top
            scale[b] = s
            for c in range(start, stop, _CHUNK):
                m = min(stop - c, _CHUNK)
                for i in range(m):
                    nib[i] = _fp4_nibble(x[c + i], s, mids)
                nib[m] = np.float32(0.0)  # an odd N's last byte: high nibble 0
                h = c // _TWO
                for j in range((m + _ONE) // _TWO):
                    pair = nib[_TWO * j] + np.float32(16.0) * nib[_TWO * j + _ONE]
                    out[h + j] = np.uint8(np.int32(pair))

    @_kernel
    def _absmax_scales(xb, scale, block, top, b0, b1):  # type: ignore[no-untyped-def]
        for b in range(b0, b1):
            start, stop = _bounds(b, block, xb.shape[0])
            scale[b] = _absmax(xb, start, stop) / top

    @_kernel
    def _fp4_encode_pairs(x, out, scale, block, mids, j0, j1):  # type: ignore[no-untyped-def]
        """Any block size (the odd ones): per byte, each element looks up its block's scale."""
        n = x.shape[0]
        for j in range(j0, j1):
            i = _TWO * j
            nib = _fp4_nibble(x[i], scale[i // block], mids)
            if i + _ONE < n:
                nib += np.float32(16.0) * _fp4_nibble(x[i + _ONE], scale[(i + _ONE) // block], mids)
            out[j] = np.uint8(np.int32(nib))

    @_kernel
    def _fp4_decode_even(src, scale, out, block, table, b0, b1):  # type: ignore[no-untyped-def]
        n = out.shape[0]
        for b in range(b0, b1):
            start, stop = _bounds(b, block, n)
            s = scale[b]
            for j in range(start // _TWO, stop // _TWO):
                byte = src[j]
                out[_TWO * j] = table[byte & np.uint8(15)] * s
                out[_TWO * j + _ONE] = table[byte >> np.uint8(4)] * s
            if stop % _TWO == _ONE:
                out[stop - _ONE] = table[src[stop // _TWO] & np.uint8(15)] * s

    @_kernel
    def _fp4_decode_pairs(src, scale, out, block, table, j0, j1):  # type: ignore[no-untyped-def]
        n = out.shape[0]
        for j in range(j0, j1):
            i = _TWO * j
            byte = src[j]
            out[i] = table[byte & np.uint8(15)] * scale[i // block]
            if i + _ONE < n:
                out[i + _ONE] = table[byte >> np.uint8(4)] * scale[(i + _ONE) // block]
