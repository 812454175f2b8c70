"""`fp4`: 4-bit floats with one fp32 absmax scale per block, two values per byte.

Streaming DiLoCo sends outer gradients as 4-bit E3M0 floats with fp32 accumulation
(Douillard et al. 2025, https://arxiv.org/abs/2501.18512); E2M1 is the OCP MX fp4 format.
A nibble is a sign bit (bit 3, set when x < 0, even if the magnitude rounds to 0) and a 3-bit
magnitude code c whose value is, with the block's scale:
    E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6            scale_b = max|x_i| / 6
    E3M0: 0, 2^-6, 2^-5, 2^-4, 2^-3, 2^-2, 2^-1, 1   scale_b = max|x_i|
    v_i = |x_i| / scale_b (fp32 division; 0 where scale_b is 0)
    c_i = the nearest magnitude to v_i, ties to the lower code
        = how many midpoints between consecutive magnitudes are < v_i (all exact in fp32)
    x̂_i = ±magnitude[c_i] * scale_b (fp32)
Element 2i is the low nibble of byte i, element 2i+1 the high one; an odd N pads a zero nibble.

Body: scale fp32[nb] | packed bytes[ceil(N / 2)]   (nb = ceil(N / B)).
These functions are the reference and the GPU path; on the CPU, Fp4Codec runs the fused
kernels of diloco/codecs/cpu_kernels.py, which match them bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diloco.codecs import cpu_kernels
from diloco.codecs.base import (
    DTYPE_FP4_E2M1,
    DTYPE_FP4_E3M0,
    HEADER_BYTES,
    Header,
    as_flat_fp32,
    block_absmax_scales,
    blocks_of,
    check_block_size,
    check_header,
    empty,
    new_payload,
    num_blocks,
    refuse_non_finite_scales,
    runs_fused,
    scales_from_body,
    scales_in,
)


@dataclass(frozen=True)
class Fp4Format:
    name: str
    codec_id: int
    dtype_id: int
    magnitudes: tuple[float, ...]
    """The 8 magnitudes of codes 0..7, in units of the block scale."""

    @property
    def qmax(self) -> float:
        """scale_b = absmax_b / qmax: the block's largest value maps to the top code."""
        return self.magnitudes[-1]

    @property
    def midpoints(self) -> tuple[float, ...]:
        return tuple(
            (a + b) / 2 for a, b in zip(self.magnitudes[:-1], self.magnitudes[1:], strict=True)
        )


E2M1 = Fp4Format("fp4_e2m1", 5, DTYPE_FP4_E2M1, (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0))
E3M0 = Fp4Format("fp4_e3m0", 6, DTYPE_FP4_E3M0, (0.0, *(2.0**-e for e in range(6, -1, -1))))
# `fp4` is the 4-bit format that trained better here (docs/codecs.md, "Which fp4").
DEFAULT_FP4 = E2M1


def fp4_encode(x_N: torch.Tensor, block: int, fmt: Fp4Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (packed uint8[ceil(N / 2)], scale_nb fp32)."""
    numel = x_N.numel()
    scale_nb = block_absmax_scales(x_N, block, fmt.qmax)
    if numel == 0:
        return x_N.new_zeros(0, dtype=torch.uint8), scale_nb
    safe_nb = torch.where(scale_nb > 0, scale_nb, torch.ones_like(scale_nb))
    x_nbB = blocks_of(x_N, block)
    v_nbB = x_nbB.abs() / safe_nb[:, None]
    v_nbB = torch.where(scale_nb[:, None] > 0, v_nbB, torch.zeros_like(v_nbB))
    midpoints = torch.tensor(fmt.midpoints, dtype=torch.float32, device=x_N.device)
    code_nbB = torch.bucketize(v_nbB, midpoints)  # right=False: midpoints strictly below v
    nibble_N = (code_nbB | ((x_nbB < 0).to(code_nbB.dtype) << 3)).reshape(-1)[:numel]
    return pack_nibbles(nibble_N.to(torch.uint8)), scale_nb


def fp4_decode(
    packed: torch.Tensor, scale_nb: torch.Tensor, numel: int, block: int, fmt: Fp4Format
) -> torch.Tensor:
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=packed.device)
    nibble_N = unpack_nibbles(packed, numel)
    magnitudes = torch.tensor(fmt.magnitudes, dtype=torch.float32, device=packed.device)
    code_N = (nibble_N & 7).to(torch.int64)
    x_nbB = blocks_of(magnitudes[code_N], block) * scale_nb[:, None]
    x_N = x_nbB.reshape(-1)[:numel]
    return torch.where(nibble_N >= 8, -x_N, x_N)


def pack_nibbles(nibble_N: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles -> bytes: element 2i low, 2i+1 high; an odd count pads a zero nibble."""
    if nibble_N.numel() % 2:
        nibble_N = torch.cat([nibble_N, nibble_N.new_zeros(1)])
    pairs = nibble_N.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1)
    return pairs.reshape(-1)[:numel]


class Fp4Codec:
    """4-bit floats with an fp32 absmax scale per block: 0.5 + 4 / B bytes per element."""

    def __init__(self, fmt: Fp4Format, block_size: int = 256):
        check_block_size(block_size, fmt.name)
        self.fmt = fmt
        self.name = fmt.name
        self.codec_id = fmt.codec_id
        self.block_size = block_size

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        """Header, scales and nibbles written into one payload; on the CPU by one fused pass.

        Raises:
            ValueError: `x_N` holds NaN or inf (found from the block scales).
        """
        x_N = as_flat_fp32(x_N)
        numel, nb = x_N.numel(), num_blocks(x_N.numel(), self.block_size)
        payload = new_payload(self._header(numel), self._body_bytes(numel), x_N.device)
        scale_nb, packed = scales_in(payload, nb), payload[HEADER_BYTES + 4 * nb :]
        if runs_fused(x_N):
            cpu_kernels.fp4_encode_into(x_N, packed, scale_nb, self.block_size, self.fmt.magnitudes)
        else:
            packed_ref, scale_ref_nb = fp4_encode(x_N, self.block_size, self.fmt)
            packed.copy_(packed_ref)
            scale_nb.copy_(scale_ref_nb)
        refuse_non_finite_scales(scale_nb, x_N, self.name)
        return payload

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        nb = num_blocks(numel, self.block_size)
        check_header(payload, self._header(numel), self._body_bytes(numel), self.name)
        body = payload[HEADER_BYTES:]
        scale_nb = scales_from_body(body, nb, self.name)
        packed = body[4 * nb :]
        if runs_fused(payload):
            x_N = empty(numel, torch.float32, payload.device)
            cpu_kernels.fp4_decode_into(
                packed.contiguous(), scale_nb, x_N, self.block_size, self.fmt.magnitudes
            )
            return x_N
        return fp4_decode(packed, scale_nb, numel, self.block_size, self.fmt)

    def payload_bytes(self, numel: int) -> int:
        return HEADER_BYTES + self._body_bytes(numel)

    def _body_bytes(self, numel: int) -> int:
        return 4 * num_blocks(numel, self.block_size) + (numel + 1) // 2

    def _header(self, numel: int) -> Header:
        return Header(self.codec_id, self.fmt.dtype_id, self.block_size, numel)
