"""The codec protocol, the payload header every codec writes, and the helpers codecs share.

A payload is a 1-D uint8 tensor on the device of the encoded tensor: a fixed header, then the
codec's packed body. Payloads are plain bytes (no pickle): any transport can carry them, and a
receiver checks the header against what it expects before decoding a single element. Byte
layouts of every codec: docs/codecs.md.

Header layout (little-endian, `HEADER_BYTES` bytes):
    magic b"DLCO" | version u8 | codec id u8 | dtype id u8 | pad u8 | block size u32 | count u64

Shape suffixes: `_N` elements of the flat tensor, `_nb` blocks (ceil(N / block)), `_nbB` the
(nb, block) view of the zero-padded tensor.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from diloco.codecs import cpu_kernels

MAGIC = b"DLCO"
VERSION = 1
_HEADER = struct.Struct("<4sBBBxIQ")
HEADER_BYTES = _HEADER.size
MAX_BLOCK_SIZE = 2**32 - 1  # the header's u32

# What the body's elements are (the header's dtype id). Codec ids live on each codec class;
# both are part of the wire format: never renumber, only add.
DTYPE_FP32 = 0
DTYPE_FP16 = 1
DTYPE_BF16 = 2
DTYPE_INT8 = 3
DTYPE_FP8_E4M3 = 4
DTYPE_FP4_E2M1 = 5
DTYPE_FP4_E3M0 = 6
DTYPE_IDS = {torch.float32: DTYPE_FP32, torch.float16: DTYPE_FP16, torch.bfloat16: DTYPE_BF16}


class PayloadError(ValueError):
    """A payload that is malformed or does not match what the receiver expects."""


@dataclass(frozen=True)
class Header:
    codec_id: int
    dtype_id: int
    block_size: int
    numel: int


class Codec(Protocol):
    """How a flat fp32 tensor is written on the wire. Pure and stateless."""

    name: str

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        """The uint8 payload (header + body) of `x_N`, on `x_N`'s device."""
        ...

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """The fp32 tensor of `numel` elements; raises PayloadError on any mismatch."""
        ...

    def payload_bytes(self, numel: int) -> int:
        """Exact size of the payload of a tensor of `numel` elements."""
        ...


def pack_header(header: Header, device: torch.device) -> torch.Tensor:
    raw = _HEADER.pack(
        MAGIC, VERSION, header.codec_id, header.dtype_id, header.block_size, header.numel
    )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


def new_payload(header: Header, body_bytes: int, device: torch.device) -> torch.Tensor:
    """A payload of `header` and an unwritten body of `body_bytes`, for the codec to fill in
    place (one buffer: no concatenation of the parts afterwards)."""
    payload = empty(HEADER_BYTES + body_bytes, torch.uint8, device)
    payload[:HEADER_BYTES] = pack_header(header, device)
    return payload


def scales_in(payload: torch.Tensor, nb: int) -> torch.Tensor:
    """The fp32 scales of a block codec's payload, as a view of bytes [HEADER_BYTES, + 4 nb):
    a 4-byte aligned float32 view, since HEADER_BYTES is a multiple of 4 and buffers start
    aligned."""
    scale_nb = payload[HEADER_BYTES : HEADER_BYTES + 4 * nb].view(torch.float32)
    assert scale_nb.data_ptr() % 4 == 0, "an fp32 view of the payload must be 4-byte aligned"
    return scale_nb


# numpy asks the kernel for transparent huge pages (madvise) on arrays of 4 MB and more;
# torch's CPU allocator does not unless THP_MEM_ALLOC_ENABLE=1 is set before it starts. The
# first touch of a fresh 496 MB buffer then costs ~45 ms instead of ~300 ms (4 KB page
# faults), against ~70 ms for copying 496 MB on this 2-core machine: bench/codecs.py.
_NUMPY_DTYPES = {torch.uint8: np.uint8, torch.float32: np.float32}


def empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized flat tensor; on the CPU, memory the OS may map in huge pages."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(numel, dtype=_NUMPY_DTYPES[dtype]))


def runs_fused(t: torch.Tensor) -> bool:
    """Whether a block codec takes the fused CPU kernels (diloco/codecs/cpu_kernels.py) for
    `t`: a CPU tensor, with numba installed. Otherwise the plain-torch functions, which are
    the reference and the GPU path."""
    return t.device.type == "cpu" and cpu_kernels.available()


def check_header(payload: torch.Tensor, expected: Header, body_bytes: int, codec: str) -> None:
    """Refuse a payload whose header or length differs from what the receiver expects."""
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise PayloadError(
            f"{codec} payload must be a 1-D uint8 tensor, got {payload.dtype} of shape "
            f"{tuple(payload.shape)}"
        )
    if payload.numel() < HEADER_BYTES:
        raise PayloadError(f"{codec} payload of {payload.numel()} bytes is shorter than a header")
    raw = bytes(payload[:HEADER_BYTES].cpu().numpy().tobytes())
    magic, version, codec_id, dtype_id, block_size, numel = _HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise PayloadError(f"not a diloco v{VERSION} payload (magic {magic!r}, version {version})")
    got = Header(codec_id, dtype_id, block_size, numel)
    if got != expected:
        differ = [
            f"{name} {getattr(got, name)} instead of {getattr(expected, name)}"
            for name in ("codec_id", "dtype_id", "block_size", "numel")
            if getattr(got, name) != getattr(expected, name)
        ]
        raise PayloadError(
            f"{codec} payload header {got} does not match expected {expected}: " + ", ".join(differ)
        )
    if payload.numel() != HEADER_BYTES + body_bytes:
        raise PayloadError(
            f"{codec} payload has {payload.numel()} bytes, expected {HEADER_BYTES + body_bytes}"
        )


def flat_fp32(x: torch.Tensor, codec: str) -> torch.Tensor:
    """`x` as a contiguous flat fp32 tensor on its device; refuses non-finite values.

    A NaN or inf pseudo-gradient must never be sent: one would poison every island's shared
    parameters at the next outer step.

    Raises:
        ValueError: `x` holds NaN or inf.
    """
    x_N = as_flat_fp32(x)
    if not all_finite(x_N):
        raise non_finite_error(x_N, codec)
    return x_N


def all_finite(x: torch.Tensor) -> bool:
    """Whether `x` holds no NaN or inf: one pass that allocates nothing of size N (min and max
    propagate NaN), where `isfinite(x).all()` writes a bool tensor as large as `x`."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def as_flat_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` as a contiguous flat fp32 tensor on its device (no copy when it already is one)."""
    return x.detach().reshape(-1).to(torch.float32).contiguous()


def refuse_non_finite_scales(scale_nb: torch.Tensor, x_N: torch.Tensor, codec: str) -> None:
    """flat_fp32's refusal at the cost of a pass over the N / B block scales instead of the N
    values: a block absmax is non-finite exactly when its block holds a NaN or an inf.

    Raises:
        ValueError: `x_N` holds NaN or inf.
    """
    if not scales_are_valid(scale_nb):
        raise non_finite_error(x_N, codec)


def non_finite_error(x_N: torch.Tensor, codec: str) -> ValueError:
    bad = int((~torch.isfinite(x_N)).sum().item())
    return ValueError(
        f"{codec} codec cannot encode a tensor with {bad} non-finite value(s) (nan or inf) "
        f"among {x_N.numel()}: a non-finite pseudo-gradient must never be sent"
    )


def check_block_size(block_size: int, codec: str, limit: int = MAX_BLOCK_SIZE) -> None:
    if not 1 <= block_size <= limit:
        raise ValueError(f"{codec} block_size must be in [1, {limit}], got {block_size}")


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def blocks_of(x_N: torch.Tensor, block_size: int) -> torch.Tensor:
    """The (nb, block_size) view of `x_N`, zero-padded at the end to whole blocks."""
    nb = num_blocks(x_N.numel(), block_size)
    pad = nb * block_size - x_N.numel()
    if pad:
        x_N = torch.cat([x_N, x_N.new_zeros(pad)])
    return x_N.view(nb, block_size)


def block_absmax_scales(x_N: torch.Tensor, block_size: int, qmax: float) -> torch.Tensor:
    """scale_b = max(|x| in block b) / qmax, in fp32 (a true division, not a multiplication
    by 1/qmax: the CPU kernels must give the same bits). A block of zeros has scale 0."""
    if x_N.numel() == 0:
        return x_N.new_zeros(0)
    absmax_nb = blocks_of(x_N, block_size).abs().amax(dim=1)
    return absmax_nb / qmax if qmax != 1.0 else absmax_nb


def scales_from_body(body: torch.Tensor, nb: int, codec: str) -> torch.Tensor:
    """The fp32 scales at the start of a body (a view of it, or a copy when the bytes are not
    4-byte aligned); refuses negative or non-finite ones (a corrupted body), which would
    otherwise decode into garbage."""
    raw = body[: 4 * nb]
    aligned = raw.storage_offset() % 4 == 0 and raw.data_ptr() % 4 == 0
    scale_nb = (raw if aligned else raw.clone()).view(torch.float32)
    if not scales_are_valid(scale_nb):
        raise PayloadError(f"{codec} payload holds negative or non-finite block scales")
    return scale_nb


def scales_are_valid(scale_nb: torch.Tensor) -> bool:
    """Every scale is finite and >= 0 (a NaN fails both).

    On the CPU through numpy: each torch op starts torch's intra-op threads, and on this
    loaded 2-core machine the check of 484k scales (124M elements) took 40-55 ms that way
    against 0.1 ms in numpy: about as long as the int8 decode kernel itself."""
    if scale_nb.numel() == 0:
        return True
    if scale_nb.device.type == "cpu":
        s_nb = scale_nb.numpy()
        return bool(s_nb.min() >= 0 and s_nb.max() < np.inf)
    return bool((torch.isfinite(scale_nb) & (scale_nb >= 0)).all())


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor (host byte order: little-endian on every platform
    torch ships for), flat uint8."""
    return t.contiguous().reshape(-1).view(torch.uint8)
