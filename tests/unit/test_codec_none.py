"""The `none` codec: fp32 bits unchanged behind a checked header."""

from __future__ import annotations

import struct

import pytest
import torch

from diloco.codecs import CODECS, HEADER_BYTES, NoneCodec, PayloadError, build_codec

SIZES = [0, 1, 7, 1000]


@pytest.mark.parametrize("numel", SIZES)
def test_round_trip_is_exact(numel: int) -> None:
    """decode(encode(x)) has the same bits as x, including -0.0, subnormals and fp32's
    extremes (non-finite values are refused: test_codecs.py)."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    if numel >= 7:
        x[:4] = torch.tensor([3.4028235e38, -3.4028235e38, -0.0, 1e-45])
    codec = NoneCodec()
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    decoded = codec.decode(payload, numel)
    assert decoded.dtype == torch.float32 and decoded.shape == (numel,)
    assert torch.equal(decoded.view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize("numel", SIZES)
def test_payload_bytes_is_the_payload_length(numel: int) -> None:
    """payload_bytes(n) is exactly len(encode(x)): header plus 4 bytes per element."""
    codec = NoneCodec()
    payload = codec.encode(torch.zeros(numel))
    assert payload.numel() == codec.payload_bytes(numel) == HEADER_BYTES + 4 * numel


def test_encode_flattens_and_converts_to_fp32() -> None:
    """Any shape and float dtype is sent as its flat fp32 values."""
    x = torch.tensor([[1.5, -2.0], [3.0, 0.25]], dtype=torch.float64)
    codec = NoneCodec()
    assert torch.equal(codec.decode(codec.encode(x), 4), torch.tensor([1.5, -2.0, 3.0, 0.25]))


def test_decoded_tensor_does_not_alias_the_payload() -> None:
    """Changing the payload afterwards does not change a decoded tensor."""
    codec = NoneCodec()
    payload = codec.encode(torch.ones(3))
    decoded = codec.decode(payload, 3)
    payload[HEADER_BYTES:] = 0
    assert torch.equal(decoded, torch.ones(3))


def test_refuses_truncated_payload() -> None:
    """A payload that lost bytes on the way is refused, naming both lengths."""
    codec = NoneCodec()
    payload = codec.encode(torch.ones(7))
    expected = HEADER_BYTES + 28
    with pytest.raises(PayloadError, match=f"has {expected - 1} bytes, expected {expected}"):
        codec.decode(payload[:-1], 7)


def test_refuses_payload_shorter_than_a_header() -> None:
    """Fewer bytes than a header: refused before anything is parsed."""
    codec = NoneCodec()
    with pytest.raises(PayloadError, match="of 5 bytes is shorter than a header"):
        codec.decode(codec.encode(torch.ones(7))[:5], 7)


def test_refuses_wrong_magic() -> None:
    """A payload that does not start with the magic bytes is not ours."""
    codec = NoneCodec()
    payload = codec.encode(torch.ones(3)).clone()
    payload[:4] = torch.tensor(list(b"XXXX"), dtype=torch.uint8)
    with pytest.raises(PayloadError, match=r"not a diloco v1 payload \(magic b'XXXX'"):
        codec.decode(payload, 3)


def test_refuses_wrong_codec_id() -> None:
    """A payload written by another codec (id in byte 5) is refused with both headers."""
    codec = NoneCodec()
    payload = codec.encode(torch.ones(3)).clone()
    payload[5] = 9
    with pytest.raises(PayloadError, match=r"none payload header Header\(codec_id=9"):
        codec.decode(payload, 3)


def test_refuses_wrong_dtype_id() -> None:
    """A header announcing another element type (byte 6) is refused."""
    codec = NoneCodec()
    payload = codec.encode(torch.ones(3)).clone()
    payload[6] = 1
    with pytest.raises(PayloadError, match=r"Header\(codec_id=0, dtype_id=1"):
        codec.decode(payload, 3)


def test_refuses_wrong_numel() -> None:
    """A payload of another size than the receiver's model is refused, naming both."""
    codec = NoneCodec()
    payload = codec.encode(torch.ones(3))
    with pytest.raises(PayloadError, match=r"numel=3\) does not match expected .*numel=4\)"):
        codec.decode(payload, 4)


def test_refuses_header_numel_that_disagrees_with_the_body() -> None:
    """A header that claims more elements than the body holds is refused on length."""
    codec = NoneCodec()
    payload = codec.encode(torch.ones(3)).clone()
    payload[12:20] = torch.tensor(list(struct.pack("<Q", 4)), dtype=torch.uint8)
    with pytest.raises(PayloadError, match=f"has {HEADER_BYTES + 12} bytes, expected"):
        codec.decode(payload, 4)


@pytest.mark.parametrize(
    "bad,got",
    [
        (torch.zeros(40, dtype=torch.float32), r"torch.float32 of shape \(40,\)"),
        (torch.zeros(2, 32, dtype=torch.uint8), r"torch.uint8 of shape \(2, 32\)"),
    ],
)
def test_refuses_a_tensor_that_is_not_1d_uint8(bad: torch.Tensor, got: str) -> None:
    """Only a 1-D uint8 tensor is a payload; the message says what came instead."""
    with pytest.raises(PayloadError, match="none payload must be a 1-D uint8 tensor, got " + got):
        NoneCodec().decode(bad, 3)


def test_registry_builds_none_and_refuses_unknown_names() -> None:
    """build_codec looks names up in the explicit CODECS dict."""
    assert isinstance(build_codec("none"), NoneCodec)
    assert "none" in CODECS
    with pytest.raises(ValueError, match="unknown codec 'zip'; known: bf16, fp16, fp4, "):
        build_codec("zip")
