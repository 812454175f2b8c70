"""The codec protocol and the payload header every codec writes.

A payload is a 1-D uint8 tensor on the device of the encoded tensor: a fixed header, then the
codec's packed body. Payloads are plain bytes (no pickle): any transport can carry them, and a
receiver checks the header against what it expects before decoding a single element.

Header layout (little-endian, `HEADER_BYTES` bytes):
    magic b"DLCO" | version u8 | codec id u8 | dtype id u8 | pad u8 | block size u32 | count u64
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
DTYPE_IDS = {torch.float32: 0}


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
        raise PayloadError(f"{codec} payload header {got} does not match expected {expected}")
    if payload.numel() != HEADER_BYTES + body_bytes:
        raise PayloadError(
            f"{codec} payload has {payload.numel()} bytes, expected {HEADER_BYTES + body_bytes}"
        )
