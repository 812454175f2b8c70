"""`topk`: per block of B elements, only the entries of largest magnitude are sent.

Sparse pseudo-gradients with error feedback are SparseLoCo's recipe (top-k per chunk plus an
error-feedback residual: https://arxiv.org/abs/2508.15706). Per block b of size_b elements (B,
or what is left for the last block):
    k_b  = max(1, ceil(fraction * size_b))   (fraction 0.1, B 256: k 26)
    kept = the k_b entries of largest |x|, ties to the lowest index, then sorted by index
Decode writes the kept values at their indices and zeros elsewhere.

Body: values fp16[K] | indices-within-block[K]  (K = sum of k_b; block by block, increasing
index within a block). Indices are uint8 when B <= 256, else uint16 little-endian (B <= 65536).
"""

from __future__ import annotations

import math

import torch

from diloco.codecs.base import (
    DTYPE_FP16,
    HEADER_BYTES,
    Header,
    PayloadError,
    as_bytes,
    check_block_size,
    check_header,
    flat_fp32,
    pack_header,
)

MAX_TOPK_BLOCK = 2**16  # indices within a block must fit in a uint16


def kept_per_block(size: int, fraction: float) -> int:
    """k_b = max(1, ceil(fraction * size)); the 1e-9 keeps 0.1 * 30 (3.0000000000000004 in
    floating point) at 3."""
    return min(size, max(1, math.ceil(fraction * size - 1e-9)))


def topk_sizes(numel: int, block: int, fraction: float) -> tuple[int, int, int, int]:
    """(full blocks, k per full block, size of the short last block (0: none), its k)."""
    full, tail = divmod(numel, block)
    return (
        full,
        kept_per_block(block, fraction),
        tail,
        kept_per_block(tail, fraction) if tail else 0,
    )


def topk_encode(
    x_N: torch.Tensor, block: int, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (values_K fp32, indices_K int64 within their block), block by block."""
    full, k_full, tail, k_tail = topk_sizes(x_N.numel(), block, fraction)
    values, indices = [], []
    for start, rows, size, k in ((0, full, block, k_full), (full * block, 1, tail, k_tail)):
        if rows == 0 or size == 0:
            continue
        x_rS = x_N[start : start + rows * size].view(rows, size)
        # A stable descending sort keeps equal magnitudes in index order: ties go to the lowest.
        order_rS = torch.sort(x_rS.abs(), dim=1, descending=True, stable=True).indices
        index_rk = order_rS[:, :k].sort(dim=1).values
        values.append(x_rS.gather(1, index_rk).reshape(-1))
        indices.append(index_rk.reshape(-1))
    if not values:
        return x_N.new_zeros(0), x_N.new_zeros(0, dtype=torch.int64)
    return torch.cat(values), torch.cat(indices)


def topk_decode(
    values_K: torch.Tensor, indices_K: torch.Tensor, numel: int, block: int, fraction: float
) -> torch.Tensor:
    """Zeros with the kept values scattered back at block start + index."""
    full, k_full, tail, k_tail = topk_sizes(numel, block, fraction)
    block_of_K = torch.arange(full * k_full + k_tail, device=values_K.device) // max(k_full, 1)
    block_size_K = torch.where(block_of_K < full, block, tail)
    if bool((indices_K >= block_size_K).any()):
        raise PayloadError("topk payload holds an index beyond its block")
    x_N = torch.zeros(numel, dtype=torch.float32, device=values_K.device)
    x_N[block_of_K * block + indices_K] = values_K.to(torch.float32)
    return x_N


class TopKCodec:
    """A fraction of each block's entries: 2 + (1 or 2) bytes per kept entry."""

    name = "topk"
    codec_id = 7

    def __init__(self, block_size: int = 256, fraction: float = 0.1):
        check_block_size(block_size, self.name, MAX_TOPK_BLOCK)
        if not 0 < fraction <= 1:
            raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
        self.block_size = block_size
        self.fraction = fraction
        self.index_bytes = 1 if block_size <= 256 else 2

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        x_N = flat_fp32(x_N, self.name)
        values_K, indices_K = topk_encode(x_N, self.block_size, self.fraction)
        half_K = values_K.to(torch.float16)
        if not bool(torch.isfinite(half_K).all()):
            raise ValueError(
                f"topk codec cannot encode values beyond {torch.finfo(torch.float16).max:g} "
                f"(fp16's range; largest |x| is {x_N.abs().max().item():g})"
            )
        header = pack_header(self._header(x_N.numel()), x_N.device)
        return torch.cat([header, as_bytes(half_K), self._index_bytes(indices_K)])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        kept = self.kept(numel)
        check_header(payload, self._header(numel), self._body_bytes(numel), self.name)
        body = payload[HEADER_BYTES:]
        values_K = body[: 2 * kept].clone().view(torch.float16)
        raw = body[2 * kept :].to(torch.int64)
        indices_K = raw if self.index_bytes == 1 else raw[0::2] | (raw[1::2] << 8)
        return topk_decode(values_K, indices_K, numel, self.block_size, self.fraction)

    def kept(self, numel: int) -> int:
        """K: how many entries a tensor of `numel` elements sends."""
        full, k_full, tail, k_tail = topk_sizes(numel, self.block_size, self.fraction)
        return full * k_full + k_tail

    def payload_bytes(self, numel: int) -> int:
        return HEADER_BYTES + self._body_bytes(numel)

    def _body_bytes(self, numel: int) -> int:
        return (2 + self.index_bytes) * self.kept(numel)

    def _index_bytes(self, indices_K: torch.Tensor) -> torch.Tensor:
        if self.index_bytes == 1:
            return indices_K.to(torch.uint8)
        low, high = (indices_K & 0xFF).to(torch.uint8), (indices_K >> 8).to(torch.uint8)
        return torch.stack([low, high], dim=1).reshape(-1)  # little-endian uint16

    def _header(self, numel: int) -> Header:
        return Header(self.codec_id, DTYPE_FP16, self.block_size, numel)
