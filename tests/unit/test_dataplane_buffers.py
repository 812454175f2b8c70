"""Buffers used again instead of faulted in afresh: ReusedBuffers hands a round's buffer out
again only once nothing reads it; decode_into decodes into a buffer the caller hands over."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diloco.aggregate import weighted_mean
from diloco.codecs import CODECS, build_codec
from diloco.codecs.base import HEADER_BYTES, PayloadError
from diloco.transports.dataplane.accumulate import Contribution, LockstepAccumulator
from diloco.transports.dataplane.buffers import ReusedBuffers
from diloco.transports.dataplane.codec_chunks import decode_into
from tests.unit.test_dataplane_accumulate import MemoryReader

pytestmark = pytest.mark.timeout(30)


def test_a_buffer_nothing_reads_is_handed_out_again() -> None:
    buffers = ReusedBuffers()
    first = buffers.take(1000)
    address = first.data_ptr()
    del first
    assert buffers.take(1000).data_ptr() == address


@pytest.mark.parametrize(
    "keep_reading",
    [
        lambda t: t,
        lambda t: t[10:20],
        lambda t: t.view(torch.float32),
        lambda t: t.numpy(),
        lambda t: memoryview(t.numpy()),
        lambda t: np.frombuffer(t.numpy(), dtype=np.uint8)[5:],
    ],
    ids=["tensor", "slice", "dtype-view", "numpy", "memoryview", "numpy-of-numpy"],
)
def test_a_buffer_still_read_is_never_handed_out(keep_reading) -> None:
    buffers = ReusedBuffers()
    first = buffers.take(1000)
    first.fill_(7)
    reader = keep_reading(first)
    address = first.data_ptr()
    del first
    second = buffers.take(1000)
    assert second.data_ptr() != address
    second.fill_(0)  # writing the new one leaves the old one's readers their bytes
    assert bytes(memoryview(np.asarray(reader)).cast("B"))[:4] == b"\x07" * 4
    second_address = second.data_ptr()
    del reader, second
    both = {buffers.take(1000).data_ptr() for _ in range(3)}  # each dropped at once: one
    assert len(both) == 1 and both < {address, second_address}


def test_at_most_keep_buffers_are_held() -> None:
    buffers = ReusedBuffers(keep=2)
    held = [buffers.take(100) for _ in range(4)]  # all in use: the last two are not held
    assert buffers.held_bytes() == 200
    del held
    buffers.take(300)  # a free one of another size makes room
    assert buffers.held_bytes() == 400
    with pytest.raises(ValueError, match="keep"):
        ReusedBuffers(keep=0)


def test_the_accumulator_takes_its_mean_from_the_buffers_and_stays_exact() -> None:
    codec, numel, weights = build_codec("none"), 5003, [1.0, 3.0]
    generator = torch.Generator().manual_seed(3)
    payloads = [codec.encode(torch.randn(numel, generator=generator)) for _ in weights]
    expected = codec.encode(weighted_mean([codec.decode(p, numel) for p in payloads], weights))
    buffers = ReusedBuffers()
    accumulator = LockstepAccumulator(codec, numel, chunk_bytes=4096, buffers=buffers)

    def mean() -> torch.Tensor:
        return accumulator.encoded_mean(
            [
                Contribution(r, w, MemoryReader(p, r))
                for r, (w, p) in enumerate(zip(weights, payloads, strict=True))
            ]
        )

    first = mean()
    assert torch.equal(first, expected)
    address = first.data_ptr()
    held = mean()  # the first is still read: a second buffer
    assert held.data_ptr() != address and torch.equal(held, expected)
    assert torch.equal(first, expected)
    del first
    again = mean()  # the first is free again
    assert again.data_ptr() == address and torch.equal(again, expected)


@pytest.mark.parametrize("codec_name", sorted(CODECS))
def test_decode_into_writes_codec_decode_into_the_given_buffer(codec_name: str) -> None:
    codec, numel = build_codec(codec_name, block_size=64), 3001
    payload = codec.encode(torch.randn(numel, generator=torch.Generator().manual_seed(5)))
    expected = codec.decode(payload, numel)
    out_N = torch.full((numel,), float("nan"))
    got = decode_into(codec, payload, numel, out_N)
    assert torch.equal(got, expected)
    if codec_name == "none":  # a view of the payload: no copy at all
        assert got.data_ptr() == payload[HEADER_BYTES:].data_ptr()
    else:
        assert got.data_ptr() == out_N.data_ptr()
    # A buffer that cannot take the values is not used: the values are still right.
    for unusable in (torch.empty(numel - 1), torch.empty(numel, dtype=torch.float64)):
        assert torch.equal(decode_into(codec, payload, numel, unusable), expected)
    with pytest.raises(PayloadError):
        decode_into(codec, payload[:-1], numel, out_N)
