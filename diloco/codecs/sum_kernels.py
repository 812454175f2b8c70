"""The grpc coordinator's weighted sums of the islands' values, compiled with numba.

`int8_weighted_sum_into` and `int8_weighted_sum_encode_into` take any number of int8
contributions in one call and write what torch's `acc.zero_()` then `acc.add_(v_k,
alpha=alpha_k)` for k = 0, 1, ... write (v_k: the decoded values), where torch's CPU add is
one fused multiply-add per element (`fma_add_matches_torch` checks that once per process, on
values that tell the two apart; callers take the torch path where it is False). Per block,
the sums sit in a scratch in L1 while every contribution is added: each contribution is read
once and the sums written once (or, encoded as they are formed, never). The values are formed
in registers as cpu_kernels.int8_decode_into forms them, and the encoding is cpu_kernels'.

`f32_weighted_sum_into` is the same one-pass sum of fp32 contributions (codec none): each
contribution read once and the sums written once, where torch's zero_(), add_() per
contribution and the finiteness pass move the sums through memory 2N + 2 times. On the
2-core AMD box of earlier measurements it was no faster than torch's passes; on the 2-core
Intel box (2 MiB of L2 a core) it takes 0.68x to 0.73x their time in memory
(bench/coordinator_mean.py) and about 0.9x the round's (docs/results/streaming.md).

Built on cpu_kernels.py (its intrinsics, `_parallel` over torch's threads, `available()`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diloco.codecs.cpu_kernels import (
    _array,
    _blocks,
    _parallel,
    available,
    int8_decode_into,
)

# The exponent field of an fp32: all ones exactly for an inf or a NaN.
_EXPONENT_BITS = 0x7F800000


def int8_weighted_sum_into(
    acc_n: torch.Tensor,
    q_ns: Sequence[torch.Tensor],
    scale_nbs: Sequence[torch.Tensor],
    block: int,
    alphas: Sequence[float],
) -> bool:
    """acc_n = sum_k alphas[k] * v_k for the int8 values v_k of (q_ns[k], scale_nbs[k]), in the
    order given, each step rounded once: what torch's `acc_n.zero_()` then
    `acc_n.add_(v_k, alpha=alphas[k])` for k = 0, 1, ... write (check `fma_add_matches_torch`
    before relying on that), with no v_k in memory: per block, each value float32(q) x scale
    is formed in a register (as int8_decode_into forms it) and added into the block's sums,
    which stay in L1 while every contribution is added. True when every sum is finite."""
    acc = _array(acc_n, torch.float32, acc_n.numel(), "acc_n")
    q_at, scale_at, weights = _int8_operands(acc.size, q_ns, scale_nbs, block, alphas)
    blocks = _blocks(acc.size, block)
    tops = _parallel(
        _int8_weighted_sum, blocks, acc.size, acc, q_at, scale_at, weights, block, blocks
    )
    return max(tops, default=0) != _EXPONENT_BITS


def int8_weighted_sum_encode_into(
    q_ns: Sequence[torch.Tensor],
    scale_nbs: Sequence[torch.Tensor],
    block: int,
    alphas: Sequence[float],
    out_q_n: torch.Tensor,
    out_scale_nb: torch.Tensor,
) -> None:
    """The int8 encoding of int8_weighted_sum_into's sums, written into `out_q_n` and
    `out_scale_nb` in one pass: bit for bit int8_weighted_sum_into then int8_encode_into, but
    the sums are never written to memory (each block's stay in L1 from its first add to its
    codes). The coordinator's mean of a chunk of int8 payloads: it reads N bytes an element
    and writes one, where adding one contribution at a time into an fp32 chunk moved 11 bytes
    an element for two. A non-finite sum gives a non-finite block scale, as in
    int8_encode_into."""
    out_q = _array(out_q_n, torch.int8, out_q_n.numel(), "out_q_n")
    out_scale = _array(out_scale_nb, torch.float32, _blocks(out_q.size, block), "out_scale_nb")
    q_at, scale_at, weights = _int8_operands(out_q.size, q_ns, scale_nbs, block, alphas)
    _parallel(
        _int8_weighted_sum_encode,
        out_scale.size,
        out_q.size,
        q_at,
        scale_at,
        weights,
        block,
        out_q,
        out_scale,
    )


def f32_weighted_sum_into(
    acc_n: torch.Tensor, x_ns: Sequence[torch.Tensor], alphas: Sequence[float]
) -> bool:
    """acc_n = sum_k alphas[k] * x_ns[k], in the order given, each step rounded once: what
    torch's `acc_n.zero_()` then `acc_n.add_(x_ns[k], alpha=alphas[k])` for k = 0, 1, ...
    write (check `fma_add_matches_torch` before relying on that), in one pass: per block the
    sums stay in L1 while every contribution is added. True when every sum is finite."""
    acc = _array(acc_n, torch.float32, acc_n.numel(), "acc_n")
    x_at = _addresses([_array(x, torch.float32, acc.size, "x_ns[k]") for x in x_ns])
    weights = _weights(alphas, len(x_ns))
    blocks = _blocks(acc.size, _F32_BLOCK)
    tops = _parallel(_f32_weighted_sum, blocks, acc.size, acc, x_at, weights, _F32_BLOCK)
    return max(tops, default=0) != _EXPONENT_BITS


_F32_BLOCK = 1024
"""Elements whose sums one pass keeps in L1 (4 KiB) while every contribution is added."""

_MATCHES_TORCH: list[bool] = []


def fma_add_matches_torch() -> bool:
    """Whether the weighted sums above write, bit for bit, what torch's CPU add with alpha writes
    on this machine (its vector loops use a fused multiply-add; a build or CPU where torch
    rounds the product first would differ). Measured once per process (about 0.1 s after the
    kernels load) on values that tell the two apart: subnormal and overflowing products,
    signed zeros, scale 0, tails off every vector width."""
    if not _MATCHES_TORCH:
        _MATCHES_TORCH.append(available() and _compare_with_torch())
    return _MATCHES_TORCH[0]


def _compare_with_torch() -> bool:
    generator = torch.Generator().manual_seed(0)
    n, block = 3 * (1 << 16) + 13, 64  # several threads' ranges; a tail off every width
    q_ns, scale_nbs, decoded = [], [], []
    for k in range(3):
        q_n = torch.randint(-128, 128, (n,), dtype=torch.int8, generator=generator)
        q_n[:8] = torch.tensor([0, 0, 127, -128, 1, -1, 0, 0], dtype=torch.int8)
        exponents = torch.randint(-44, 37, (_blocks(n, block),), generator=generator)
        scale_nb = torch.rand(_blocks(n, block), generator=generator) * torch.pow(10.0, exponents)
        scale_nb[k : k + 3] = torch.tensor([0.0, 3e36, 1e-44])
        decoded_n = torch.empty(n)
        int8_decode_into(q_n, scale_nb, decoded_n, block)
        q_ns.append(q_n)
        scale_nbs.append(scale_nb)
        decoded.append(decoded_n)
    # The fp32 sums take the decoded values themselves (subnormal, huge and zero products),
    # with signed zeros and an inf in the mix.
    values = [decoded_n.clone() for decoded_n in decoded]
    values[0][8:12] = torch.tensor([-0.0, 0.0, -0.0, float("inf")])
    values[1][8:12] = torch.tensor([-0.0, -0.0, 0.0, 1.0])
    for alphas in ([1 / 3, 0.7, 2.5], [1e-3, 7 / 1009, 1.0], [0.25]):
        count = len(alphas)
        got_n = torch.full((n,), float("nan"))
        finite = int8_weighted_sum_into(got_n, q_ns[:count], scale_nbs[:count], block, alphas)
        if not _same_sums(got_n, decoded[:count], alphas, finite):
            return False
        got_n.fill_(float("nan"))
        finite = f32_weighted_sum_into(got_n, values[:count], alphas)
        if not _same_sums(got_n, values[:count], alphas, finite):
            return False
    return True


def _same_sums(
    got_n: torch.Tensor, values: Sequence[torch.Tensor], alphas: Sequence[float], finite: bool
) -> bool:
    """Whether `got_n` and `finite` are what torch's zero_() then add_() of each writes."""
    expected_n = torch.zeros_like(got_n)
    for values_n, alpha in zip(values, alphas, strict=True):
        expected_n.add_(values_n, alpha=alpha)
    return finite == bool(torch.isfinite(expected_n).all()) and torch.equal(
        got_n.view(torch.int32), expected_n.view(torch.int32)
    )


def _int8_operands(
    numel: int,
    q_ns: Sequence[torch.Tensor],
    scale_nbs: Sequence[torch.Tensor],
    block: int,
    alphas: Sequence[float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The addresses of each contribution's checked codes and block scales, and the weights."""
    if len(q_ns) != len(scale_nbs):
        raise ValueError(f"{len(q_ns)} code tensors but {len(scale_nbs)} scale tensors")
    blocks = _blocks(numel, block)
    q_at = _addresses([_array(q, torch.int8, numel, "q_ns[k]") for q in q_ns])
    scale_at = _addresses([_array(s, torch.float32, blocks, "scale_nbs[k]") for s in scale_nbs])
    return q_at, scale_at, _weights(alphas, len(q_ns))


def _addresses(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The data addresses of checked arrays, for the kernels that take any number of them
    (one compiled kernel for every count, where a tuple of arrays compiles one per length,
    about a second each). The caller holds the arrays while the kernel runs."""
    return np.array([a.ctypes.data for a in arrays], dtype=np.uint64)


def _weights(alphas: Sequence[float], count: int) -> np.ndarray:
    if len(alphas) != count or count < 1:
        raise ValueError(f"need one weight for each of {count} (>= 1) contributions, got {alphas}")
    return np.asarray(alphas, dtype=np.float32)


if available():
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic
    from numba.np.numpy_support import carray

    from diloco.codecs.cpu_kernels import (
        _ABS,
        _bits_of_f32,
        _bounds,
        _f32_from_bits,
        _fma,
        _inline,
        _int8_code,
        _kernel,
    )

    _EXPONENT = np.uint32(_EXPONENT_BITS)
    _ZERO = np.float32(0.0)

    @intrinsic
    def _int8_at(typingctx, address):  # type: ignore[no-untyped-def]
        """The int8 pointer at the uint64 `address` (see _addresses)."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))

        return types.CPointer(types.int8)(types.uint64), codegen  # type: ignore[no-untyped-call]

    @intrinsic
    def _f32_at(typingctx, address):  # type: ignore[no-untyped-def]
        """The float32 pointer at the uint64 `address` (see _addresses)."""

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.inttoptr(args[0], ir.PointerType(ir.FloatType()))

        return types.CPointer(types.float32)(types.uint64), codegen  # type: ignore[no-untyped-call]

    # The weighted sums: sums[j] = fma(v_k[j], alpha_k, sums[j]) for k = 0, 1, ..., starting
    # from +0.0, as torch's zero_() then add_(v_k, alpha=alpha_k) compute them (its vector
    # loops use a fused multiply-add; a -0.0 product added to +0.0 gives +0.0). A block's sums
    # live in a scratch (1 KiB for blocks of 256) that stays in L1 while every contribution
    # is added: the contributions are read once, the sums written once or not at all. Indices
    # are unsigned (`_bounds`) so that the loops vectorize.
    @_inline
    def _int8_block_sums(q_at, scale_at, alphas, n, nb, b, start, width, sums):  # type: ignore[no-untyped-def]
        sums[:width] = _ZERO
        for k in range(alphas.shape[0]):
            q, s = carray(_int8_at(q_at[k]), n), carray(_f32_at(scale_at[k]), nb)[b]  # type: ignore[call-arg]
            for j in range(width):
                sums[j] = _fma(np.float32(q[start + j]) * s, alphas[k], sums[j])

    # The largest exponent field among the sums is returned (an integer max: it vectorizes,
    # where a float reduction would not without fastmath); all ones means an inf or a NaN.
    @_kernel
    def _int8_weighted_sum(acc, q_at, scale_at, alphas, block, nb, b0, b1):  # type: ignore[no-untyped-def]
        n = acc.shape[0]
        sums = np.empty(block, np.float32)
        top = np.uint32(0)
        for b in range(b0, b1):
            start, stop = _bounds(b, block, n)
            width = stop - start
            _int8_block_sums(q_at, scale_at, alphas, n, nb, b, start, width, sums)
            for j in range(width):
                r = sums[j]
                acc[start + j] = r
                top = max(top, _bits_of_f32(r) & _EXPONENT)  # type: ignore[call-arg]
        return top

    # The fp32 sums: the first contribution's products start a block's sums (fma onto +0.0,
    # as torch's add onto zero_() does), the middle ones are added in the scratch, and the
    # last one's are added on the way out to `acc`: for two contributions, two passes over a
    # block in L1 and no pass over the sums alone.
    @_kernel
    def _f32_weighted_sum(acc, x_at, alphas, block, b0, b1):  # type: ignore[no-untyped-def]
        n, last = acc.shape[0], alphas.shape[0] - 1
        sums = np.zeros(block, np.float32)
        top = np.uint32(0)
        first = carray(_f32_at(x_at[0]), n)  # type: ignore[call-arg]
        final = carray(_f32_at(x_at[last]), n)
        for b in range(b0, b1):
            start, stop = _bounds(b, block, n)
            width = stop - start
            if last > 0:
                for j in range(width):
                    sums[j] = _fma(first[start + j], alphas[0], _ZERO)
            for k in range(1, last):
                x = carray(_f32_at(x_at[k]), n)
                for j in range(width):
                    sums[j] = _fma(x[start + j], alphas[k], sums[j])
            for j in range(width):
                r = _fma(final[start + j], alphas[last], sums[j])
                acc[start + j] = r
                top = max(top, _bits_of_f32(r) & _EXPONENT)
        return top

    @_kernel
    def _int8_weighted_sum_encode(q_at, scale_at, alphas, block, out_q, out_scale, b0, b1):  # type: ignore[no-untyped-def]
        n, nb = out_q.shape[0], out_scale.shape[0]
        sums = np.empty(block, np.float32)
        for b in range(b0, b1):
            start, stop = _bounds(b, block, n)
            width = stop - start
            _int8_block_sums(q_at, scale_at, alphas, n, nb, b, start, width, sums)
            m = np.uint32(0)
            for j in range(width):
                m = max(m, np.uint32(_bits_of_f32(sums[j]) & _ABS))  # type: ignore[call-arg]
            s = _f32_from_bits(m) / np.float32(127.0)  # type: ignore[call-arg]
            out_scale[b] = s
            if s == np.float32(0.0):  # x / 0 would be NaN
                for j in range(width):
                    out_q[start + j] = 0
                continue
            for j in range(width):
                out_q[start + j] = _int8_code(sums[j], s)
