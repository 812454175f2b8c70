"""Codecs that write floats as floats: `none` (fp32 bits unchanged), `fp16` and `bf16`.

Body: the N values in the wire dtype, little-endian; no block size (the header says 0).
fp16 keeps 11 significant bits (relative error <= 2^-11 per element) in a range of +-65504;
bf16 keeps 8 (<= 2^-8) in fp32's range. Both round to nearest even.
"""

from __future__ import annotations

import torch

from diloco.codecs.base import (
    DTYPE_IDS,
    HEADER_BYTES,
    Header,
    all_finite,
    check_header,
    empty,
    flat_fp32,
    new_payload,
)


def cast_encode(x: torch.Tensor, dtype: torch.dtype, codec_id: int, codec: str) -> torch.Tensor:
    """Header + the values of `x` cast to `dtype`; refuses values the cast would overflow."""
    x_N = flat_fp32(x, codec)
    size = torch.empty((), dtype=dtype).element_size()
    header = Header(codec_id, DTYPE_IDS[dtype], 0, x_N.numel())
    payload = new_payload(header, size * x_N.numel(), x_N.device)
    wire_N = payload[HEADER_BYTES:].view(dtype)
    wire_N.copy_(x_N)  # the cast, written straight into the payload: no temporary
    if dtype != torch.float32 and not all_finite(wire_N):
        raise ValueError(
            f"{codec} codec cannot encode values beyond {torch.finfo(dtype).max:g} "
            f"(largest |x| is {x_N.abs().max().item():g}); use bf16 or a scaled codec"
        )
    return payload


def cast_decode(
    payload: torch.Tensor, numel: int, dtype: torch.dtype, codec_id: int, codec: str
) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    check_header(payload, Header(codec_id, DTYPE_IDS[dtype], 0, numel), size * numel, codec)
    body = payload[HEADER_BYTES:]
    if body.data_ptr() % size:  # a payload at an odd offset: realign before viewing
        body = body.clone()
    # One pass from the wire dtype into a fresh fp32 tensor that never aliases the payload.
    out_N = empty(numel, torch.float32, payload.device)
    out_N.copy_(body.view(dtype))
    return out_N


class NoneCodec:
    """fp32 on the wire: exact, 4 bytes per element."""

    name = "none"
    codec_id = 0

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        return cast_encode(x_N, torch.float32, self.codec_id, self.name)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return cast_decode(payload, numel, torch.float32, self.codec_id, self.name)

    def payload_bytes(self, numel: int) -> int:
        return HEADER_BYTES + 4 * numel


def none_payload_to_fill(numel: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A `none` payload of `numel` values and an fp32 view of its body: whoever writes the
    values there has made `NoneCodec().encode` of them without a copy (the caller checks they
    are finite, which `encode` would refuse otherwise)."""
    header = Header(NoneCodec.codec_id, DTYPE_IDS[torch.float32], 0, numel)
    payload = new_payload(header, 4 * numel, device)
    return payload, payload[HEADER_BYTES:].view(torch.float32)


class Fp16Codec:
    """IEEE half on the wire: 2 bytes per element, relative error <= 2^-11, |x| <= 65504."""

    name = "fp16"
    codec_id = 1

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        return cast_encode(x_N, torch.float16, self.codec_id, self.name)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return cast_decode(payload, numel, torch.float16, self.codec_id, self.name)

    def payload_bytes(self, numel: int) -> int:
        return HEADER_BYTES + 2 * numel


class Bf16Codec:
    """bfloat16 on the wire: 2 bytes per element, relative error <= 2^-8, fp32's range."""

    name = "bf16"
    codec_id = 2

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        return cast_encode(x_N, torch.bfloat16, self.codec_id, self.name)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return cast_decode(payload, numel, torch.bfloat16, self.codec_id, self.name)

    def payload_bytes(self, numel: int) -> int:
        return HEADER_BYTES + 2 * numel
