"""The lossy codecs (fp16, bf16, int8, fp8, fp4, topk): error bounds, exact byte layouts,
payload sizes, and refusals. `none` has its own file (test_codec_none.py).

Bounds per element, with scale_b the block's scale (docs/codecs.md derives them):
    fp16 |e| <= 2^-11 |x|      bf16 |e| <= 2^-8 |x|
    int8 |e| <= scale_b / 2    (scale_b = absmax_b / 127)
    fp8  |e| <= 2^-4 |x| + 2^-10 scale_b   (subnormals below 2^-6 scale_b)
    E2M1 |e| <= max(|x|, scale_b) / 4      E3M0 |e| <= max(|x| / 3, 2^-7 scale_b)
    topk: kept entries within fp16 rounding, the others are 0 and no larger than a kept one.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch

from diloco.codecs import (
    CODECS,
    DEFAULT_FP4,
    E2M1,
    E3M0,
    HEADER_BYTES,
    Codec,
    Fp4Codec,
    Int8Codec,
    PayloadError,
    TopKCodec,
    build_codec,
    cpu_kernels,
)
from diloco.codecs.fp4 import fp4_decode, fp4_encode
from diloco.codecs.int8 import int8_decode, int8_encode
from diloco.outer import weighted_mean
from diloco.transports import LocalGroup, ring_allreduce_bytes

B = 16  # a small block, so that small tensors span several blocks
SIZES = [0, 1, 7, B - 1, B + 1, 1000]
LOSSY = ["fp16", "bf16", "int8", "fp8", "fp4_e2m1", "fp4_e3m0", "topk"]
FRACTION = 0.25
TINY = 1e-6  # fp32 slack on bounds that are exact in real arithmetic


def make(name: str, block: int = B) -> Codec:
    return build_codec(name, block_size=block, topk_fraction=FRACTION)


def gaussian(numel: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def round_trip(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    return codec.decode(codec.encode(x), x.numel())


def block_scales(x: torch.Tensor, block: int, qmax: float) -> torch.Tensor:
    """Each element's block scale absmax_b / qmax, in float64."""
    absmax = [x[i : i + block].abs().max().item() for i in range(0, x.numel(), block)]
    return torch.tensor(absmax, dtype=torch.float64).repeat_interleave(block)[: x.numel()] / qmax


def error_bound(name: str, x: torch.Tensor, block: int) -> torch.Tensor:
    """The per-element bound of the module docstring, float64."""
    ax = x.double().abs()
    if name == "fp16":
        return ax * 2**-11
    if name == "bf16":
        return ax * 2**-8
    if name == "int8":
        return block_scales(x, block, 127) / 2 + TINY * ax
    if name == "fp8":
        return ax * 2**-4 + block_scales(x, block, 448) * 2**-10 + TINY * ax
    if name == "fp4_e2m1":
        return torch.maximum(ax, block_scales(x, block, 6)) / 4 + TINY * ax
    if name == "fp4_e3m0":
        return torch.maximum(ax / 3, block_scales(x, block, 1) * 2**-7) + TINY * ax
    raise AssertionError(name)


def topk_reference(x: torch.Tensor, block: int, fraction: float) -> torch.Tensor:
    """Which entries topk keeps, written plainly: per block, sort by (-|x|, index)."""
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    for start in range(0, x.numel(), block):
        size = min(block, x.numel() - start)
        k = max(1, math.ceil(Fraction(fraction).limit_denominator(1000) * size))
        ranked = sorted(range(size), key=lambda i: (-abs(x[start + i].item()), i))
        keep[[start + i for i in ranked[:k]]] = True
    return keep


def predicted_bytes(name: str, numel: int, block: int) -> int:
    nb = -(-numel // block)
    body = {
        "none": 4 * numel,
        "fp16": 2 * numel,
        "bf16": 2 * numel,
        "int8": 4 * nb + numel,
        "fp8": 4 * nb + numel,
        "fp4": 4 * nb + (numel + 1) // 2,
        "fp4_e2m1": 4 * nb + (numel + 1) // 2,
        "fp4_e3m0": 4 * nb + (numel + 1) // 2,
    }
    if name == "topk":
        kept = int(topk_reference(torch.arange(numel, dtype=torch.float32), block, FRACTION).sum())
        return HEADER_BYTES + (3 if block <= 256 else 4) * kept
    return HEADER_BYTES + body[name]


# --- round trips and bounds --------------------------------------------------------------


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("name", LOSSY)
def test_round_trip_within_the_per_element_bound(name: str, numel: int) -> None:
    """decode(encode(x)) is fp32 of the right size, and each element within its bound."""
    x = gaussian(numel, seed=numel)
    codec = make(name)
    decoded = round_trip(codec, x)
    assert decoded.dtype == torch.float32 and decoded.shape == (numel,)
    if name == "topk":
        keep = topk_reference(x, B, FRACTION)
        assert torch.equal(decoded != 0, keep)  # Gaussian entries are never exactly 0
        assert torch.equal(decoded[keep], x[keep].half().float())
        for start in range(0, numel, B):
            block, kept = x[start : start + B].abs(), keep[start : start + B]
            assert kept.any() and (kept.all() or block[~kept].max() <= block[kept].min())
        return
    error = (decoded.double() - x.double()).abs()
    bound = error_bound(name, x, B)
    worst = (error - bound).max().item() if numel else 0.0
    assert worst <= 0, f"{name}: an element is {worst:g} beyond its bound"


# Relative error ||x̂ - x|| / ||x|| of 1000 Gaussian values, block 16, topk fraction 0.25.
# Measured on seed 1000 (max over seeds 1000-1019): fp16 2.16e-4 (2.21e-4), bf16 1.64e-3
# (1.76e-3), int8 4.77e-3 (4.80e-3), fp8 2.31e-2 (2.36e-2), E2M1 0.095 (0.099), E3M0 0.171
# (0.178), topk 0.550 (0.578). The bounds leave ~10% over the worst seed.
RELATIVE_BOUND = {
    "none": 0.0,
    "fp16": 2.5e-4,
    "bf16": 2e-3,
    "int8": 5.5e-3,
    "fp8": 2.7e-2,
    "fp4_e2m1": 0.11,
    "fp4_e3m0": 0.2,
    "topk": 0.63,
}


@pytest.mark.parametrize("name", sorted(RELATIVE_BOUND))
def test_relative_error_of_gaussian_values(name: str) -> None:
    x = gaussian(1000, seed=1000)
    relative = ((round_trip(make(name), x) - x).norm() / x.norm()).item()
    assert relative <= RELATIVE_BOUND[name], f"{name}: relative error {relative:.3g}"


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("name", sorted(CODECS))
def test_payload_size_is_predicted(name: str, numel: int) -> None:
    """len(encode(x)) == payload_bytes(numel) == header + the body of docs/codecs.md."""
    codec = make(name)
    payload = codec.encode(gaussian(numel))
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == codec.payload_bytes(numel) == predicted_bytes(name, numel, B)


def test_topk_index_width_follows_the_block_size() -> None:
    """uint8 indices up to block 256, uint16 little-endian above; the high byte is used."""
    assert make("topk", 256).payload_bytes(256) == HEADER_BYTES + 64 * 3
    codec = make("topk", 300)
    assert codec.payload_bytes(300) == HEADER_BYTES + 75 * 4
    x = torch.zeros(300)
    x[299] = 5.0  # index 299 = 0x012B
    payload = codec.encode(x)
    assert payload[HEADER_BYTES + 2 * 75 :][-2:].tolist() == [0x2B, 0x01]
    assert round_trip(codec, x)[299] == 5.0


@pytest.mark.parametrize("name", ["int8", "fp8", "fp4_e2m1", "fp4_e3m0", "topk"])
def test_a_block_of_zeros(name: str) -> None:
    """A block of zeros has scale 0 and decodes to exact zeros; the next block is unaffected."""
    x = torch.cat([torch.zeros(B), gaussian(B)])
    decoded = round_trip(make(name), x)
    assert torch.equal(decoded[:B], torch.zeros(B))
    assert (decoded[B:] != 0).any()
    if name != "topk":
        scale0 = make(name).encode(x)[HEADER_BYTES : HEADER_BYTES + 4].clone().view(torch.float32)
        assert scale0.item() == 0.0
    assert torch.equal(round_trip(make(name), torch.zeros(5)), torch.zeros(5))


@pytest.mark.parametrize("name", ["int8", "fp8", "fp4_e2m1", "fp4_e3m0"])
def test_one_huge_outlier_costs_only_its_own_block(name: str) -> None:
    """A 1e6 outlier is kept within its bound and the other blocks keep their precision:
    the point of per-block scales."""
    x = gaussian(1000, seed=3)
    x[500] = 1e6
    decoded = round_trip(make(name), x)
    assert (decoded.double() - x.double()).abs().le(error_bound(name, x, B)).all()
    outlier_block = slice(496, 512)
    others = torch.ones(1000, dtype=torch.bool)
    others[outlier_block] = False
    clean = x.clone()
    clean[500] = 0.0
    expected = round_trip(make(name), clean)
    assert torch.equal(decoded[others], expected[others])
    assert abs(decoded[500].item() - 1e6) <= 1e6 * 0.25


def test_topk_keeps_an_outlier_and_fp16_refuses_one_beyond_its_range() -> None:
    x = gaussian(1000, seed=4)
    x[10] = 6e4
    assert round_trip(make("topk"), x)[10] == x[10].half().float()
    x[10] = 1e5
    for name in ("fp16", "topk"):
        with pytest.raises(ValueError, match=rf"{name} codec cannot encode values beyond 65504"):
            make(name).encode(x)
    assert torch.allclose(round_trip(make("bf16"), x)[10], x[10], rtol=2**-8)


def test_ties_go_to_the_lowest_index_in_topk() -> None:
    """Equal magnitudes: the lowest indices are kept (one block of 8, k = 2)."""
    x = torch.tensor([1.0, -3.0, 3.0, 1.0, -3.0, 0.5, 3.0, 2.0])
    decoded = round_trip(build_codec("topk", block_size=8, topk_fraction=0.25), x)
    assert decoded.tolist() == [0.0, -3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # A whole block of equal magnitudes (where an unstable sort would pick any 26).
    x = torch.ones(256) * torch.tensor([1.0, -1.0]).repeat(128)
    decoded = round_trip(build_codec("topk", block_size=256, topk_fraction=0.1), x)
    assert torch.equal(decoded.nonzero().flatten(), torch.arange(26))


# --- exact byte layouts ------------------------------------------------------------------


def header(codec_id: int, dtype_id: int, block: int, numel: int) -> bytes:
    return b"DLCO" + bytes([1, codec_id, dtype_id, 0]) + struct.pack("<IQ", block, numel)


def f32(value: float) -> bytes:
    return struct.pack("<f", value)


def test_int8_byte_layout() -> None:
    """5 values, block 4: header | scales fp32[2] | q int8[5]; x / scale rounds half to even
    (2.5 -> 2, -1.5 -> -2, 0.5 -> 0)."""
    x = torch.tensor([2.5, -1.5, 0.5, 127.0, -3.0])
    scale1 = float(np.float32(3.0) / np.float32(127.0))
    expected = (
        header(3, 3, 4, 5)
        + f32(1.0)
        + f32(scale1)
        + bytes([2, 0xFE, 0, 127, 0x81])  # 2, -2, 0, 127 | -127
    )
    payload = Int8Codec(block_size=4).encode(x)
    assert bytes(payload.numpy()) == expected
    assert Int8Codec(block_size=4).decode(payload, 5).tolist() == pytest.approx(
        [2.0, -2.0, 0.0, 127.0, -3.0], rel=1e-6
    )


def test_int8_functions_match_the_formula() -> None:
    """int8_encode / int8_decode: the pure functions the CPU kernels are checked against."""
    x = gaussian(37, seed=5)
    q, scale = int8_encode(x, 16)
    assert q.dtype == torch.int8 and q.shape == (37,) and scale.shape == (3,)
    for b in range(3):
        block = x[16 * b : 16 * b + 16]
        assert scale[b] == block.abs().max() / 127
        assert torch.equal(q[16 * b : 16 * b + 16], torch.round(block / scale[b]).to(torch.int8))
    assert torch.equal(int8_decode(q, scale, 16), q.float() * scale.repeat_interleave(16)[:37])


def test_fp4_e2m1_byte_layout() -> None:
    """5 values, block 4: header | scales | nibbles, element 2i low and 2i+1 high, odd count
    padded. Ties go to the lower code (5 -> 4, 1.25 -> 1, 0.25 -> 0); a negative value that
    rounds to 0 still sets the sign bit."""
    x = torch.tensor([6.0, 5.0, -0.25, 1.25, 0.1])
    scale1 = float(np.float32(0.1) / np.float32(6.0))
    # codes: 6 -> 7, 5 -> 6 (4.0), -0.25 -> 8 (sign | 0), 1.25 -> 2 (1.0) | 0.1 -> 7
    expected = header(5, 5, 4, 5) + f32(1.0) + f32(scale1) + bytes([0x67, 0x28, 0x07])
    codec = Fp4Codec(E2M1, block_size=4)
    payload = codec.encode(x)
    assert bytes(payload.numpy()) == expected
    decoded = codec.decode(payload, 5)
    assert decoded[:4].tolist() == [6.0, 4.0, 0.0, 1.0]
    assert math.copysign(1.0, decoded[2].item()) == -1.0
    assert decoded[4].item() == pytest.approx(0.1, rel=1e-6)


def test_fp4_e3m0_byte_layout() -> None:
    """E3M0: magnitudes 0 and 2^-6 .. 1 times the block's absmax; 0.75 ties to 0.5."""
    x = torch.tensor([1.0, -0.5, 0.75, 0.01, -3.0])
    # codes: 1 -> 7, -0.5 -> 8|6, 0.75 -> 6, 0.01 -> 1 (2^-6) | -3 -> 8|7
    expected = header(6, 6, 4, 5) + f32(1.0) + f32(3.0) + bytes([0xE7, 0x16, 0x0F])
    codec = Fp4Codec(E3M0, block_size=4)
    payload = codec.encode(x)
    assert bytes(payload.numpy()) == expected
    assert codec.decode(payload, 5).tolist() == [1.0, -0.5, 0.5, 2**-6, -3.0]


def test_topk_byte_layout() -> None:
    """Block 4, fraction 0.5: values fp16[K] then uint8 indices within the block, by index."""
    x = torch.tensor([0.5, -4.0, 1.0, 2.0, 3.0])
    codec = TopKCodec(block_size=4, fraction=0.5)
    values = struct.pack("<3e", -4.0, 2.0, 3.0)
    expected = header(7, 1, 4, 5) + values + bytes([1, 3, 0])
    assert bytes(codec.encode(x).numpy()) == expected


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_refuses_non_finite_values(name: str, bad: float) -> None:
    x = gaussian(40)
    x[7] = bad
    with pytest.raises(ValueError, match="cannot encode a tensor with 1 non-finite value"):
        make(name).encode(x)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_refuses_truncated_and_padded_payloads(name: str) -> None:
    codec = make(name)
    payload = codec.encode(gaussian(40))
    size = payload.numel()
    with pytest.raises(PayloadError, match=f"has {size - 1} bytes, expected {size}"):
        codec.decode(payload[:-1], 40)
    with pytest.raises(PayloadError, match=f"has {size + 1} bytes, expected {size}"):
        codec.decode(torch.cat([payload, payload[:1]]), 40)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_refuses_another_count(name: str) -> None:
    codec = make(name)
    with pytest.raises(PayloadError, match="does not match expected .*: numel 40 instead of 41"):
        codec.decode(codec.encode(gaussian(40)), 41)


@pytest.mark.parametrize(
    ("sender", "receiver", "differs"),
    [
        ("int8", "fp4_e2m1", "codec_id 3 instead of 5, dtype_id 3 instead of 5"),
        ("fp4_e3m0", "fp4_e2m1", "codec_id 6 instead of 5, dtype_id 6 instead of 5"),
        ("fp16", "bf16", "codec_id 1 instead of 2, dtype_id 1 instead of 2"),
        ("none", "topk", "codec_id 0 instead of 7, dtype_id 0 instead of 1, block_size 0"),
    ],
)
def test_refuses_another_codec(sender: str, receiver: str, differs: str) -> None:
    with pytest.raises(PayloadError, match=f"{receiver} payload header .*: {differs}"):
        make(receiver).decode(make(sender).encode(gaussian(40)), 40)


@pytest.mark.parametrize("name", ["int8", "fp8", "fp4_e2m1", "fp4_e3m0", "topk"])
def test_refuses_another_block_size(name: str) -> None:
    with pytest.raises(PayloadError, match=f"{name} payload .*: block_size 16 instead of 32"):
        make(name, 32).decode(make(name, 16).encode(gaussian(64)), 64)


def test_refuses_another_version() -> None:
    payload = make("int8").encode(gaussian(40)).clone()
    payload[4] = 2
    with pytest.raises(PayloadError, match="not a diloco v1 payload .*version 2"):
        make("int8").decode(payload, 40)


@pytest.mark.parametrize("name", ["int8", "fp8", "fp4_e2m1", "fp4_e3m0"])
@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_refuses_a_corrupted_scale(name: str, scale: float) -> None:
    payload = make(name).encode(gaussian(40)).clone()
    payload[HEADER_BYTES + 4 : HEADER_BYTES + 8] = torch.tensor([scale]).view(torch.uint8)
    with pytest.raises(PayloadError, match=f"{name} payload holds negative or non-finite"):
        make(name).decode(payload, 40)


def test_topk_refuses_an_index_beyond_its_block() -> None:
    """Block 16 with 1-byte indices: an index of 200 would write into another block."""
    codec = make("topk")
    payload = codec.encode(gaussian(40)).clone()
    payload[-1] = 200
    with pytest.raises(PayloadError, match="topk payload holds an index beyond its block"):
        codec.decode(payload, 40)


# --- registry, shapes, devices -----------------------------------------------------------


def test_registry() -> None:
    """Every name builds its codec; fp4 is the default format; ids never collide."""
    codecs = {name: make(name) for name in CODECS}
    assert sorted(CODECS) == sorted(["none", "fp4", *LOSSY])
    assert isinstance(codecs["fp4"], Fp4Codec) and codecs["fp4"].fmt is DEFAULT_FP4
    ids = {(c.codec_id, c.name) for name, c in codecs.items() if name != "fp4"}  # type: ignore[attr-defined]
    assert len({codec_id for codec_id, _ in ids}) == len(ids) == len(CODECS) - 1
    assert codecs["int8"].block_size == B  # type: ignore[attr-defined]
    assert codecs["topk"].fraction == FRACTION  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: build_codec("int8", block_size=0), r"int8 block_size must be in \[1, "),
        (lambda: build_codec("topk", block_size=65537), r"topk block_size must be in \[1, 65536"),
        (lambda: build_codec("topk", topk_fraction=0.0), r"topk fraction must be in \(0, 1\]"),
        (lambda: build_codec("fp4", block_size=-3), r"fp4_e\w+ block_size must be in \[1, "),
    ],
)
def test_refuses_impossible_options(build: Callable[[], Codec], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("name", LOSSY)
def test_any_shape_and_dtype_is_sent_flat(name: str) -> None:
    """A 2-D float64 tensor is encoded as its flat fp32 values; decoding never aliases."""
    x = gaussian(40).double().view(5, 8)
    codec = make(name)
    payload = codec.encode(x)
    decoded = codec.decode(payload, 40)
    assert torch.equal(decoded, round_trip(codec, x.reshape(-1).float()))
    payload[HEADER_BYTES:] = 0
    assert torch.equal(decoded, round_trip(codec, x.reshape(-1).float()))


def test_local_transport_carries_int8_payloads() -> None:
    """Two islands (threads) send int8 payloads: both get the mean of the decoded payloads,
    and bytes count the real int8 payload size."""
    numel, codec = 100, Int8Codec(block_size=B)
    group = LocalGroup(2, codec, numel, timeout_s=20)
    xs = [gaussian(numel, seed=rank) for rank in range(2)]
    results: list = [None, None]  # type: ignore[type-arg]

    def island(rank: int) -> None:
        results[rank] = group.transport(rank).average(codec.encode(xs[rank]), 1.0, round=0)

    threads = [threading.Thread(target=island, args=(rank,), daemon=True) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    expected = weighted_mean([round_trip(codec, x) for x in xs], [1.0, 1.0])
    wire = ring_allreduce_bytes(HEADER_BYTES + 4 * 7 + numel, 2)
    for result in results:
        assert result is not None and torch.equal(result.mean, expected)
        assert result.bytes_sent == result.bytes_received == wire == 148
    assert not torch.equal(expected, (xs[0] + xs[1]) / 2)  # the codec's loss is really there


# --- the CPU fast path and the torch path ------------------------------------------------

BLOCK_CODECS = ["int8", "fp4_e2m1", "fp4_e3m0"]
KERNELS = ["int8_encode_into", "int8_decode_into", "fp4_encode_into", "fp4_decode_into"]


def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without numba: the codecs must not touch a kernel."""
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    for kernel in KERNELS:
        monkeypatch.setattr(cpu_kernels, kernel, lambda *args: pytest.fail("kernel called"))


def wide(numel: int, seed: int) -> torch.Tensor:
    """Gaussian values over ~10 decades, an all-zero stretch and negative zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.exp(3 * torch.randn(numel, generator=gen))
    x[numel // 3 : numel // 3 + 40] = 0.0
    x[::97] = -0.0
    return x


@pytest.mark.parametrize("block", [256, 16, 7, 1])
@pytest.mark.parametrize("numel", [0, 1, 7, 255, 257, 10_001])
@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_cpu_kernels_and_torch_path_give_the_same_bytes(
    name: str, numel: int, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Byte-identical payloads, and decodes identical to the bit (-0.0 included)."""
    pytest.importorskip("numba")
    x = wide(numel, seed=numel + block)
    codec = make(name, block)
    fused = codec.encode(x)
    fused_decoded = codec.decode(fused, numel)
    torch_path(monkeypatch)
    reference = codec.encode(x)
    assert torch.equal(fused, reference)
    assert torch.equal(
        fused_decoded.view(torch.int32), codec.decode(reference, numel).view(torch.int32)
    )


@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_cpu_tensors_take_the_kernels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numba")
    calls: list[str] = []
    for kernel in KERNELS:
        real = getattr(cpu_kernels, kernel)
        monkeypatch.setattr(
            cpu_kernels, kernel, lambda *args, k=kernel, f=real: (calls.append(k), f(*args))
        )
    round_trip(make(name), gaussian(100))
    family = name.split("_")[0]
    assert calls == [f"{family}_encode_into", f"{family}_decode_into"]


@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_without_numba_the_torch_functions_run(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """available() False: the payload is the reference functions' output, byte for byte."""
    torch_path(monkeypatch)
    x, codec = gaussian(1000, seed=6), make(name)
    payload = codec.encode(x)
    body = payload[HEADER_BYTES:]
    if name == "int8":
        q, scale = int8_encode(x, B)
        assert torch.equal(body, torch.cat([scale.view(torch.uint8), q.view(torch.uint8)]))
        assert torch.equal(codec.decode(payload, 1000), int8_decode(q, scale, B))
    else:
        fmt = E2M1 if name == "fp4_e2m1" else E3M0
        packed, scale = fp4_encode(x, B, fmt)
        assert torch.equal(body, torch.cat([scale.view(torch.uint8), packed]))
        assert torch.equal(codec.decode(payload, 1000), fp4_decode(packed, scale, 1000, B, fmt))


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_both_paths_count_every_non_finite_value(
    name: str, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal reads the block scales, yet still counts the bad values exactly."""
    if fused:
        pytest.importorskip("numba")
    else:
        torch_path(monkeypatch)
    x = gaussian(100)
    x[[3, 5, 90]] = torch.tensor([float("nan"), float("inf"), float("-inf")])  # 2 blocks
    with pytest.raises(ValueError, match="cannot encode a tensor with 3 non-finite value.* 100:"):
        make(name).encode(x)


@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_a_payload_at_an_odd_offset_decodes(name: str) -> None:
    """A payload sliced out of a larger buffer (its scales then unaligned) decodes the same."""
    codec, x = make(name), gaussian(1001, seed=7)
    payload = codec.encode(x)
    buffer = torch.zeros(payload.numel() + 1, dtype=torch.uint8)
    buffer[1:] = payload
    assert torch.equal(codec.decode(buffer[1:], 1001), codec.decode(payload, 1001))
