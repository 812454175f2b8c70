"""A codec plug-in: fp16 on the wire with the shared header (docs/plugins.md, "A codec")."""

from __future__ import annotations

import torch

from diloco.codecs.base import DTYPE_FP16, HEADER_BYTES, Header, check_header, pack_header


class HalfCodec:
    """fp16 on the wire: 2 bytes per element, lossy (diloco's own is `fp16`)."""

    name = "half"
    codec_id = 200  # unique among codecs (0-127 are diloco's): a receiver refuses another's

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        half_N = x_N.detach().reshape(-1).to(torch.float16).contiguous()
        header = pack_header(Header(self.codec_id, DTYPE_FP16, 0, half_N.numel()), half_N.device)
        return torch.cat([header, half_N.view(torch.uint8)])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        check_header(payload, Header(self.codec_id, DTYPE_FP16, 0, numel), 2 * numel, self.name)
        return payload[HEADER_BYTES:].clone().view(torch.float16).to(torch.float32)

    def payload_bytes(self, numel: int) -> int:
        return HEADER_BYTES + 2 * numel
