"""`fp8`: 8-bit floats (e4m3, torch.float8_e4m3fn) with one fp32 absmax scale per block.

Per block b of B elements:
    scale_b = max|x_i| / 448                       (448: e4m3's largest finite value)
    e_i     = e4m3(clamp(x_i / scale_b, -448, 448))  (round to nearest even; 0 where scale_b is 0)
    x̂_i     = float(e_i) * scale_b
e4m3 keeps 4 significant bits: relative error <= 2^-4 per element for values in the normal
range, and subnormals below 2^-6 * scale_b (a 2^-9 * absmax step) for the smallest.

Body: scale fp32[nb] | e4m3 bytes[N]   (nb = ceil(N / B)).
"""

from __future__ import annotations

import torch

from diloco.codecs.base import (
    DTYPE_FP8_E4M3,
    HEADER_BYTES,
    Header,
    as_bytes,
    block_absmax_scales,
    blocks_of,
    check_block_size,
    check_header,
    flat_fp32,
    num_blocks,
    pack_header,
    scales_from_body,
)

E4M3_MAX = 448.0


def fp8_encode(x_N: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (e_N float8_e4m3fn, scale_nb fp32)."""
    numel = x_N.numel()
    scale_nb = block_absmax_scales(x_N, block, E4M3_MAX)
    if numel == 0:
        return x_N.new_zeros(0).to(torch.float8_e4m3fn), scale_nb
    safe_nb = torch.where(scale_nb > 0, scale_nb, torch.ones_like(scale_nb))
    y_nbB = blocks_of(x_N, block) / safe_nb[:, None]
    y_nbB = torch.where(scale_nb[:, None] > 0, y_nbB, torch.zeros_like(y_nbB))
    # x / scale may round a hair above 448; whether a cast saturates or gives NaN beyond
    # e4m3's range has varied between torch versions and devices, so clamp first.
    e_nbB = y_nbB.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return e_nbB.reshape(-1)[:numel], scale_nb


def fp8_decode(e_N: torch.Tensor, scale_nb: torch.Tensor, block: int) -> torch.Tensor:
    numel = e_N.numel()
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=e_N.device)
    x_nbB = blocks_of(e_N.to(torch.float32), block) * scale_nb[:, None]
    return x_nbB.reshape(-1)[:numel].contiguous()


class Fp8Codec:
    """e4m3 with an fp32 absmax scale per block: 1 + 4 / B bytes per element."""

    name = "fp8"
    codec_id = 4

    def __init__(self, block_size: int = 256):
        check_block_size(block_size, self.name)
        self.block_size = block_size

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        x_N = flat_fp32(x_N, self.name)
        e_N, scale_nb = fp8_encode(x_N, self.block_size)
        header = pack_header(self._header(x_N.numel()), x_N.device)
        return torch.cat([header, as_bytes(scale_nb), as_bytes(e_N)])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        nb = num_blocks(numel, self.block_size)
        check_header(payload, self._header(numel), self._body_bytes(numel), self.name)
        body = payload[HEADER_BYTES:]
        scale_nb = scales_from_body(body, nb, self.name)
        e_N = body[4 * nb :].view(torch.float8_e4m3fn)
        return fp8_decode(e_N, scale_nb, self.block_size)

    def payload_bytes(self, numel: int) -> int:
        return HEADER_BYTES + self._body_bytes(numel)

    def _body_bytes(self, numel: int) -> int:
        return 4 * num_blocks(numel, self.block_size) + numel

    def _header(self, numel: int) -> Header:
        return Header(self.codec_id, DTYPE_FP8_E4M3, self.block_size, numel)
