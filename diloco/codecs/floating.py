"""Codecs that write floats as floats: `none` sends the fp32 bits unchanged."""

from __future__ import annotations

import torch

from diloco.codecs.base import HEADER_BYTES, Header, check_header, pack_header

_FP32 = 0


class NoneCodec:
    """fp32 on the wire: exact, 4 bytes per element."""

    name = "none"
    codec_id = 0

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        x_N = x_N.detach().reshape(-1).to(torch.float32).contiguous()
        header = pack_header(Header(self.codec_id, _FP32, 0, x_N.numel()), x_N.device)
        return torch.cat([header, x_N.view(torch.uint8)])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        check_header(payload, Header(self.codec_id, _FP32, 0, numel), 4 * numel, self.name)
        return payload[HEADER_BYTES:].clone().view(torch.float32)

    def payload_bytes(self, numel: int) -> int:
        return HEADER_BYTES + 4 * numel
