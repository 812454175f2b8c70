"""The fused numba kernels give bit for bit what the torch references in int8.py and fp4.py give,
and the coordinator's int8 weighted sums (sum_kernels.py) what torch's zero_() and add_() write.

Awkward sizes and block sizes (odd ones take the kernels' other path), all-zero blocks, one huge
outlier, negative zeros, exact ties, and values spread over many orders of magnitude.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

pytest.importorskip("numba")

from diloco.codecs import E2M1, E3M0, Fp4Format, sum_kernels  # noqa: E402
from diloco.codecs import cpu_kernels as kernels  # noqa: E402
from diloco.codecs.fp4 import fp4_decode, fp4_encode  # noqa: E402
from diloco.codecs.int8 import int8_decode, int8_encode  # noqa: E402

BLOCKS = [256, 16, 7, 1, 1024]
SIZES = [0, 1, 7, 255, 257, 10_001]
FORMATS = [E2M1, E3M0]


def awkward(numel: int, block: int, seed: int = 0) -> torch.Tensor:
    """Gaussian values over ~10 decades, with the special cases planted when there is room."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.exp(3 * torch.randn(numel, generator=gen))
    if numel > 2 * block + 3:
        x[:block] = 0.0  # an all-zero block
        x[block : 2 * block : 3] = -0.0  # negative zeros among ordinary values
        x[numel // 2] = 1e30  # one outlier: the rest of its block rounds to 0
        x[-1] = -0.0
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    """Exact comparison of floats, telling -0.0 from 0.0."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    mismatch = (bits(got) != bits(want)).nonzero().flatten()
    assert mismatch.numel() == 0, f"{mismatch.numel()} differ, first at {mismatch[:5].tolist()}"


def kernel_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.numel(), dtype=torch.int8)
    scale = torch.empty(-(-x.numel() // block))
    kernels.int8_encode_into(x, q, scale, block)
    return q, scale


def kernel_fp4(x: torch.Tensor, block: int, fmt: Fp4Format) -> tuple[torch.Tensor, torch.Tensor]:
    packed = torch.empty((x.numel() + 1) // 2, dtype=torch.uint8)
    scale = torch.empty(-(-x.numel() // block))
    kernels.fp4_encode_into(x, packed, scale, block, fmt.magnitudes)
    return packed, scale


def test_available() -> None:
    assert kernels.available()


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("numel", SIZES)
def test_int8_matches_reference(numel: int, block: int) -> None:
    x = awkward(numel, block)
    q, scale = kernel_int8(x, block)
    q_ref, scale_ref = int8_encode(x, block)
    assert_same(scale, scale_ref)
    assert_same(q, q_ref)
    out = torch.empty(numel)
    kernels.int8_decode_into(q, scale, out, block)
    assert_same(out, int8_decode(q_ref, scale_ref, block))


FMA_ADD = pytest.mark.skipif(
    not sum_kernels.fma_add_matches_torch(),
    reason="torch's CPU add with alpha does not round as one fused multiply-add here",
)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """The kernels split their work over torch's threads: run with `count` of them."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_sums(numel: int, block: int, count: int) -> Iterator[tuple[Any, ...]]:
    """(q_ns, scale_nbs, values, alphas, expected): `count` int8 contributions (codes and
    scales), their fp32 values, weights, and what torch's zero_() then add_(values_k,
    alpha=alphas[k]) for each k write."""
    q_ns, scale_nbs, values = [], [], []
    for k in range(count):
        q, scale = kernel_int8(awkward(numel, block, seed=k), block)
        q_ns.append(q)
        scale_nbs.append(scale)
        values.append(int8_decode(q, scale, block))
    for alphas in ([1 / 3, 0.7, 7 / 1009, 2.5], [0.25] * 4, [1e-3, 1.0, 3.0, 1 / 7]):
        expected = torch.zeros(numel)
        for values_n, alpha in zip(values, alphas[:count], strict=False):
            expected.add_(values_n, alpha=alpha)
        yield q_ns, scale_nbs, values, alphas[:count], expected


@FMA_ADD
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("numel", SIZES + [300_007])
def test_int8_weighted_sum_is_decode_then_torchs_adds(
    numel: int, block: int, threads: int, count: int
) -> None:
    """acc = sum_k alpha_k * decode(q_k, scale_k), as torch's zero_() / add_() write it, bit
    for bit, signed zeros included, whatever acc held; the flag says whether all is finite."""
    with torch_threads(threads):
        for q_ns, scale_nbs, _, alphas, expected in torch_sums(numel, block, count):
            got = torch.full((numel,), float("nan"))
            finite = sum_kernels.int8_weighted_sum_into(got, q_ns, scale_nbs, block, alphas)
            assert_same(got, expected)
            assert finite == bool(torch.isfinite(expected).all())


@FMA_ADD
@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("numel", SIZES + [1023, 1025, 300_007])
def test_f32_weighted_sum_is_torchs_adds(numel: int, threads: int, count: int) -> None:
    """acc = sum_k alpha_k * x_k for fp32 contributions, as torch's zero_() / add_() write it,
    bit for bit (signed zeros, subnormal and overflowing products, a NaN and an inf), whatever
    acc held, over block tails; the flag says whether every sum is finite."""
    values = [awkward(numel, 7, seed=k) * 10.0 ** (12 * k) for k in range(count)]
    if numel > 20:
        values[0][13:16] = torch.tensor([-0.0, float("inf"), 0.0])
        values[-1][13:17] = torch.tensor([-0.0, 1.0, -0.0, float("nan")])
    with torch_threads(threads):
        for alphas in ([1 / 3, 0.7, 7 / 1009, 2.5], [1e-3, 1.0, 3e30, 1 / 7]):
            expected = torch.zeros(numel)
            for values_n, alpha in zip(values, alphas, strict=False):
                expected.add_(values_n, alpha=alpha)
            got = torch.full((numel,), float("nan"))
            finite = sum_kernels.f32_weighted_sum_into(got, values, alphas[:count])
            assert_same(got, expected)
            assert finite == bool(torch.isfinite(expected).all())
            if numel > 20:
                assert not finite  # the inf or the NaN planted above


def test_f32_weighted_sum_refuses_mismatched_operands() -> None:
    if not sum_kernels.available():
        pytest.skip("numba is not installed")
    with pytest.raises(ValueError, match="one weight for each of 2"):
        sum_kernels.f32_weighted_sum_into(torch.zeros(4), [torch.ones(4)] * 2, [1.0])
    with pytest.raises(ValueError, match="x_ns"):
        sum_kernels.f32_weighted_sum_into(torch.zeros(4), [torch.ones(5)], [1.0])


@FMA_ADD
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("numel", SIZES + [300_007])
def test_int8_weighted_sum_encode_is_torchs_adds_then_the_reference_encode(
    numel: int, block: int, threads: int, count: int
) -> None:
    """The coordinator's mean of a chunk and its encoding in one pass: int8_encode of what
    torch's zero_() / add_() write, bit for bit (all-zero blocks: scale 0)."""
    with torch_threads(threads):
        for q_ns, scale_nbs, _, alphas, expected in torch_sums(numel, block, count):
            q_ref, scale_ref = int8_encode(expected, block)
            out_q, out_scale = weighted_sum_encode(q_ns, scale_nbs, block, alphas)
            assert_same(out_scale, scale_ref)
            assert_same(out_q, q_ref)


def weighted_sum_encode(
    q_ns: list[torch.Tensor], scale_nbs: list[torch.Tensor], block: int, alphas: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    out_q, out_scale = torch.full_like(q_ns[0], 99), torch.full_like(scale_nbs[0], float("nan"))
    sum_kernels.int8_weighted_sum_encode_into(q_ns, scale_nbs, block, alphas, out_q, out_scale)
    return out_q, out_scale


LARGEST = float(torch.finfo(torch.float32).max)


@FMA_ADD
def test_int8_weighted_sum_encode_gives_an_overflowing_block_a_non_finite_scale() -> None:
    """A sum that overflows makes its block's scale inf, which every caller refuses (as
    int8_encode_into's scale of an inf); the other blocks are encoded as usual."""
    q = torch.tensor([127, 0, 0, 0, 1, 2, 3, 4], dtype=torch.int8)
    scale = torch.tensor([LARGEST / 128, 1.0])
    out_q, out_scale = weighted_sum_encode([q, q], [scale, scale], 4, [1.0, 1.0])
    assert out_scale[0] == float("inf")
    assert out_scale[1] == 8 / 127 and out_q[4:].tolist() == [32, 64, 95, 127]


@FMA_ADD
def test_the_weighted_sums_say_when_a_result_is_not_finite() -> None:
    q = torch.tensor([127, -128, 1, 0], dtype=torch.int8)
    scale = torch.tensor([LARGEST / 127.5])  # 127 x scale is finite, -128 x scale is not
    acc = torch.zeros(4)
    assert not sum_kernels.int8_weighted_sum_into(acc, [q], [scale], 4, [1.0])
    assert acc[1] == float("-inf")
    q = torch.tensor([127, 0, 0, 0], dtype=torch.int8)
    assert sum_kernels.int8_weighted_sum_into(acc, [q], [scale], 4, [1.0])
    assert not sum_kernels.int8_weighted_sum_into(acc, [q, q], [scale, scale], 4, [1.0, 1.0])
    assert acc[0] == float("inf") and acc[1] == 0.0


def test_the_weighted_sums_refuse_operands_that_do_not_fit() -> None:
    """The kernels read raw addresses: every operand is checked first, in a ValueError."""
    q, scale = torch.zeros(8, dtype=torch.int8), torch.ones(2)
    with pytest.raises(ValueError, match="q_ns"):
        sum_kernels.int8_weighted_sum_into(torch.zeros(8), [q, q[:4]], [scale, scale], 4, [1, 1])
    with pytest.raises(ValueError, match="scale_nbs"):
        sum_kernels.int8_weighted_sum_into(torch.zeros(8), [q], [scale[:1]], 4, [1.0])
    with pytest.raises(ValueError, match="2 code tensors but 1 scale"):
        sum_kernels.int8_weighted_sum_into(torch.zeros(8), [q, q], [scale], 4, [1.0, 1.0])
    with pytest.raises(ValueError, match="one weight for each of 2"):
        weighted_sum_encode([q, q], [scale, scale], 4, [1.0])
    strided = torch.zeros(8, dtype=torch.int8).view(2, 4).t()
    with pytest.raises(ValueError, match=r"q_ns.*shape \(4, 2\)"):
        sum_kernels.int8_weighted_sum_into(torch.zeros(8), [strided], [scale], 4, [1.0])
    with pytest.raises(ValueError, match=r"one weight for each of 0 \(>= 1\)"):
        sum_kernels.int8_weighted_sum_into(torch.zeros(8), [], [], 4, [])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("numel", SIZES)
def test_fp4_matches_reference(numel: int, block: int, fmt: Fp4Format) -> None:
    x = awkward(numel, block)
    packed, scale = kernel_fp4(x, block, fmt)
    packed_ref, scale_ref = fp4_encode(x, block, fmt)
    assert_same(scale, scale_ref)
    assert_same(packed, packed_ref)
    out = torch.empty(numel)
    kernels.fp4_decode_into(packed, scale, out, block, fmt.magnitudes)
    assert_same(out, fp4_decode(packed_ref, scale_ref, numel, block, fmt))


def test_int8_ties_round_half_to_even() -> None:
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -127.0, 0.0])  # scale exactly 1
    q, scale = kernel_int8(x, 8)
    assert scale.tolist() == [1.0]
    assert q.tolist() == [127, 0, 2, 2, 0, -2, -127, 0]


def test_fp4_e2m1_ties_go_to_the_lower_code_and_pack_low_nibble_first() -> None:
    # scale 1: 0.25, 0.75, 2.5, 5 sit exactly on midpoints; -0.25 keeps its sign bit.
    x = torch.tensor([6.0, 0.25, 0.75, 2.5, 5.0, -0.25, -5.0, -0.0, 1.0])
    packed, scale = kernel_fp4(x, 16, E2M1)
    assert scale.tolist() == [1.0]
    codes = [7, 0, 1, 4, 6, 8 | 0, 8 | 6, 0, 2, 0]  # padded with a zero nibble
    assert packed.tolist() == [lo | hi << 4 for lo, hi in zip(codes[::2], codes[1::2], strict=True)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_makes_its_block_scale_non_finite(bad: float) -> None:
    x = awkward(1000, 16)
    x[100] = bad  # block 6
    finite = torch.arange(-(-1000 // 16)) != 6
    for scale, scale_ref in [
        (kernel_int8(x, 16)[1], int8_encode(x, 16)[1]),
        (kernel_fp4(x, 16, E2M1)[1], fp4_encode(x, 16, E2M1)[1]),
    ]:
        assert torch.isfinite(scale).tolist() == finite.tolist()
        assert_same(scale[finite], scale_ref[finite])


@pytest.mark.parametrize("threads", [1, 2])
def test_same_bits_on_any_thread_count(threads: int) -> None:
    x = awkward(300_007, 256, seed=1)  # more than one thread's share
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, scale = kernel_int8(x, 256)
        packed, scale4 = kernel_fp4(x, 256, E2M1)
    finally:
        torch.set_num_threads(before)
    assert_same(q, int8_encode(x, 256)[0])
    assert_same(packed, fp4_encode(x, 256, E2M1)[0])


def test_concurrent_calls_from_two_threads() -> None:
    xs = [awkward(200_000, 256, seed=s) for s in range(2)]
    results: list[torch.Tensor | None] = [None, None]

    def encode(i: int) -> None:
        for _ in range(5):
            results[i] = kernel_int8(xs[i], 256)[0]

    threads = [threading.Thread(target=encode, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for x, got in zip(xs, results, strict=True):
        assert got is not None
        assert_same(got, int8_encode(x, 256)[0])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: kernels.int8_encode_into(torch.zeros(8), torch.zeros(8), torch.zeros(1), 8),
            "q_N",
        ),
        (
            lambda: kernels.int8_encode_into(
                torch.zeros(8), torch.zeros(8, dtype=torch.int8), torch.zeros(2), 8
            ),
            "scale_nb",
        ),
        (
            lambda: kernels.int8_decode_into(
                torch.zeros(8, dtype=torch.int8), torch.zeros(1), torch.zeros(8)[::2], 8
            ),
            "out_N",
        ),
        (
            lambda: kernels.fp4_encode_into(
                torch.zeros(9),
                torch.zeros(4, dtype=torch.uint8),
                torch.zeros(1),
                16,
                E2M1.magnitudes,
            ),
            "packed",
        ),
        (
            lambda: kernels.int8_encode_into(
                torch.zeros(8), torch.zeros(8, dtype=torch.int8), torch.zeros(1), 0
            ),
            "block size",
        ),
        (
            lambda: kernels.fp4_tables([0.0, 1.0, 2.0]),
            "8 increasing magnitudes",
        ),
    ],
)
def test_refuses_wrong_buffers(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()
