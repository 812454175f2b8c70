"""ReusedBuffers: a round's buffer is handed out again only once nothing reads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diloco.aggregate import weighted_mean
from diloco.codecs import build_codec
from diloco.transports.dataplane.accumulate import Contribution, LockstepAccumulator
from diloco.transports.dataplane.buffers import ReusedBuffers
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
