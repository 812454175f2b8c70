"""`int8`: 8-bit integers with one fp32 absmax scale per block of B elements.

INTELLECT-1 sent its pseudo-gradients as int8 (with a binned codebook rather than absmax
scales: https://arxiv.org/abs/2412.01152). Per block b:
    scale_b = max|x_i| / 127                       (fp32 division; 0 for a block of zeros)
    q_i     = clamp(round_half_even(x_i / scale_b), -127, 127)   (0 where scale_b is 0)
    x̂_i     = q_i * scale_b                        (fp32)
so |x̂_i - x_i| <= scale_b / 2 = max|x| / 254 within each block.

Body: scale fp32[nb] | q int8[N]   (nb = ceil(N / B); the last block may be short).
These functions are the reference and the GPU path; on the CPU, Int8Codec runs the fused
kernels of diloco/codecs/cpu_kernels.py, which match them bit for bit.
"""

from __future__ import annotations

import torch

from diloco.codecs import cpu_kernels
from diloco.codecs.base import (
    DTYPE_INT8,
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

QMAX = 127.0


def int8_encode(x_N: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax quantisation of a flat fp32 tensor.

    Returns:
        (q_N int8, scale_nb fp32)
    """
    numel = x_N.numel()
    scale_nb = block_absmax_scales(x_N, block, QMAX)
    if numel == 0:
        return x_N.new_zeros(0, dtype=torch.int8), scale_nb
    safe_nb = torch.where(scale_nb > 0, scale_nb, torch.ones_like(scale_nb))
    y_nbB = blocks_of(x_N, block) / safe_nb[:, None]
    y_nbB = torch.where(scale_nb[:, None] > 0, y_nbB, torch.zeros_like(y_nbB))
    q_nbB = torch.round(y_nbB).clamp_(-QMAX, QMAX)  # torch.round: half to even
    return q_nbB.reshape(-1)[:numel].to(torch.int8), scale_nb


def int8_decode(q_N: torch.Tensor, scale_nb: torch.Tensor, block: int) -> torch.Tensor:
    """x̂ = q * scale of its block, in fp32."""
    numel = q_N.numel()
    if numel == 0:
        return torch.zeros(0, dtype=torch.float32, device=q_N.device)
    x_nbB = blocks_of(q_N.to(torch.float32), block) * scale_nb[:, None]
    return x_nbB.reshape(-1)[:numel].contiguous()


class Int8Codec:
    """int8 with an fp32 absmax scale per block: 1 + 4 / B bytes per element."""

    name = "int8"
    codec_id = 3

    def __init__(self, block_size: int = 256):
        check_block_size(block_size, self.name)
        self.block_size = block_size

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        """Header, scales and codes written into one payload; on the CPU by one fused pass.

        Raises:
            ValueError: `x_N` holds NaN or inf (found from the block scales).
        """
        x_N = as_flat_fp32(x_N)
        numel, nb = x_N.numel(), num_blocks(x_N.numel(), self.block_size)
        payload = new_payload(self._header(numel), self._body_bytes(numel), x_N.device)
        scale_nb, q_N = scales_in(payload, nb), payload[HEADER_BYTES + 4 * nb :].view(torch.int8)
        if runs_fused(x_N):
            cpu_kernels.int8_encode_into(x_N, q_N, scale_nb, self.block_size)
        else:
            q_ref_N, scale_ref_nb = int8_encode(x_N, self.block_size)
            q_N.copy_(q_ref_N)
            scale_nb.copy_(scale_ref_nb)
        refuse_non_finite_scales(scale_nb, x_N, self.name)
        return payload

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        nb = num_blocks(numel, self.block_size)
        check_header(payload, self._header(numel), self._body_bytes(numel), self.name)
        body = payload[HEADER_BYTES:]
        scale_nb = scales_from_body(body, nb, self.name)
        q_N = body[4 * nb :].view(torch.int8)
        if runs_fused(payload):
            x_N = empty(numel, torch.float32, payload.device)
            cpu_kernels.int8_decode_into(q_N.contiguous(), scale_nb, x_N, self.block_size)
            return x_N
        return int8_decode(q_N, scale_nb, self.block_size)

    def payload_bytes(self, numel: int) -> int:
        return HEADER_BYTES + self._body_bytes(numel)

    def _body_bytes(self, numel: int) -> int:
        return 4 * num_blocks(numel, self.block_size) + numel

    def _header(self, numel: int) -> Header:
        return Header(self.codec_id, DTYPE_INT8, self.block_size, numel)
