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

import struct
from dataclasses import dataclass
from typing import Protocol

import torch

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
    x_N = x.detach().reshape(-1).to(torch.float32).contiguous()
    bad = int((~torch.isfinite(x_N)).sum().item()) if x_N.numel() else 0
    if bad:
        raise ValueError(
            f"{codec} codec cannot encode a tensor with {bad} non-finite value(s) (nan or inf) "
            f"among {x_N.numel()}: a non-finite pseudo-gradient must never be sent"
        )
    return x_N


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
    """The fp32 scales at the start of a body; refuses negative or non-finite ones (a
    corrupted body), which would otherwise decode into garbage."""
    scale_nb = body[: 4 * nb].clone().view(torch.float32)
    if nb and not bool((torch.isfinite(scale_nb) & (scale_nb >= 0)).all()):
        raise PayloadError(f"{codec} payload holds negative or non-finite block scales")
    return scale_nb


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor (host byte order: little-endian on every platform
    torch ships for), flat uint8."""
    return t.contiguous().reshape(-1).view(torch.uint8)
