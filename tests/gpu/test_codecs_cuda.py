"""Codecs on the GPU: encode and decode run on the tensor's device and give the same bytes and
values as on the CPU (the formats are exact fp32 arithmetic). Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from diloco.codecs import CODECS, build_codec  # noqa: E402


@pytest.mark.parametrize("numel", [0, 1, 7, 1000, 100_003])
@pytest.mark.parametrize("name", sorted(CODECS))
def test_cuda_payload_equals_cpu_payload(name: str, numel: int) -> None:
    x = torch.distributions.StudentT(3.0).sample((numel,))
    codec = build_codec(name, block_size=64, topk_fraction=0.1)
    payload_cpu = codec.encode(x)
    payload_gpu = codec.encode(x.cuda())
    assert payload_gpu.device.type == "cuda"
    assert torch.equal(payload_gpu.cpu(), payload_cpu)
    decoded_gpu = codec.decode(payload_gpu, numel)
    assert decoded_gpu.device.type == "cuda"
    assert torch.equal(decoded_gpu.cpu(), codec.decode(payload_cpu, numel))
