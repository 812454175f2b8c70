"""Fused decode-and-accumulate: the round's weighted mean straight from the islands' streams.

Bit for bit what the coordinator computes today, `weighted_mean([codec.decode(p_i)], w)`
(diloco/aggregate.py), and `codec.encode` of it, with no fp32 copy of any island's whole
vector: the payloads are read chunk by chunk (block-aligned), in **lockstep** (chunk j of
every participant, in rank order, then chunk j + 1):

    acc_n = 0
    acc_n.add_(decode(chunk j of rank i), alpha=w_i / W)    i = 0, 1, ...  (torch's fused FMA;
                                                            W = sum of the weights, in order)
    then acc_n is encoded into the mean payload (or left in the caller's fp32 buffer)

(`weighted_mean`'s older form started from `d_0 * (w_0 / W)`: the same values, but a -0.0
where this gives +0.0; the accumulator follows the form in diloco/aggregate.py.) The
chunk's contributions are summed in one call (`ChunkCodec.mean_chunk`). For int8, where a
check at the first use shows the one-pass kernels write what torch's add writes on this
machine, each block has all its contributions added while its sums sit in L1
(`sum_kernels.int8_weighted_sum_into`, which also says whether every sum is finite, so no
pass checks it), and a mean to encode is encoded as its sums are formed
(`int8_weighted_sum_encode_into`): its fp32 chunk is never written. On the 2-core boxes that
takes 2.1-3.8x less time than adding one island at a time, under a memcpy of the islands'
fp32 values (bench/coordinator_mean.py). fp32 payloads (codec none) are summed in one pass
the same way (`sum_kernels.f32_weighted_sum_into`: 0.68x to 0.73x the time of torch's
passes on the Intel box; on the AMD box of earlier runs it was no faster). Other codecs are
added one island at a time in torch.

Every element sees the same operations in the same order as in `weighted_mean`, on the same
torch kernels (per element, torch's CPU add with alpha is one fused multiply-add whatever the
element's position in the loop; chunks are also multiples of 64 elements so that vector and
scalar tails of a loop fall on the same elements as in a whole-vector call). Order is why the
participants and their total weight W must be fixed before the first chunk: the control plane
fixes them from the round's headers, then the islands stream. Memory: one prefix (block
scales, or topk's values) and two chunks of wire bytes per participant (the one being summed
and the one read ahead by its thread, prefetch.py), plus two fp32 chunks; TCP backpressure
holds the rest of each stream in the senders' buffers.

Failures (every one raises ParticipantFailed naming the rank; the partial sums are dropped,
nothing is emitted for a chunk that did not complete, and the caller retries the exchange
without that participant on new tickets):
- a header, scale or index that is not the expected codec's: reason "refused";
- a non-finite decoded value: reason "refused" (found on the accumulated chunk, then traced
  to its participant by decoding that chunk of each again; int8, fp4 and topk payloads whose
  prefixes prove every value finite skip that pass, `ChunkCodec.finite_by_prefix`);
- a stream that stalls, breaks, passes its deadline, or overruns its size: the stream's reason.

Shape suffixes: `_n` elements of one chunk, `_N` of the whole vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diloco.codecs.base import Codec, PayloadError, all_finite, empty
from diloco.transports.dataplane.buffers import ReusedBuffers
from diloco.transports.dataplane.codec_chunks import (
    ChunkCodec,
    ContributionError,
    chunk_codec,
    new_payload,
)
from diloco.transports.dataplane.framing import ChunkReader, StreamError
from diloco.transports.dataplane.prefetch import InlineSections, PrefetchedSections

# Chunk lengths are multiples of this many elements (see the module docstring).
_VECTOR_ALIGNMENT = 64
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Contribution:
    rank: int
    weight: float
    """Tokens this round (w_i); the mean is sum_i w_i d_i / sum_i w_i."""
    reader: ChunkReader


class ParticipantFailed(RuntimeError):
    """One participant's stream or payload stopped the exchange; `reason` is a short code."""

    def __init__(self, rank: int, reason: str, message: str):
        super().__init__(f"island {rank}: {message}")
        self.rank = rank
        self.reason = reason


class LockstepAccumulator:
    """The weighted mean of `numel`-element payloads of one codec, read in lockstep."""

    def __init__(
        self,
        codec: Codec,
        numel: int,
        *,
        chunk_bytes: int = 4 << 20,
        prefetch: bool = True,
        buffers: ReusedBuffers | None = None,
    ):
        """
        Args:
            chunk_bytes: each participant's wire bytes in one chunk (rounded to whole
                blocks; at most as many elements, so the fp32 working chunks are at most 4x).
            prefetch: read each participant a chunk ahead in a thread of its own (prefetch.py);
                False reads chunk j of each participant only when it is accumulated.
            buffers: where `encoded_mean` takes its payload (a buffer of an earlier round
                that nothing reads any more: no page faults); None allocates one.
        """
        if numel < 1:
            raise ValueError(f"numel must be >= 1, got {numel}")
        self.codec = codec
        self.numel = numel
        self.prefetch = prefetch
        self.buffers = buffers
        self.chunked: ChunkCodec = chunk_codec(codec, numel)
        step = math.lcm(self.chunked.alignment, _VECTOR_ALIGNMENT)
        # Sized by the wire bytes, not the fp32 values: a chunk of int8 codes then holds 4x the
        # elements of an fp32 one, which measured 0.82x to 0.94x the round's time (124M and 25M,
        # 2 and 4 islands) for the same buffer per participant; fp32 chunks over 4 MiB were
        # slower (docs/results/streaming.md).
        per_element = max(self.chunked.section_offset(numel), 1) / numel  # prefix apart
        elements = min(chunk_bytes, int(chunk_bytes / per_element))
        self.chunk_elements = max(step, elements // step * step)

    @property
    def payload_bytes(self) -> int:
        return self.chunked.payload_bytes

    def encoded_mean(self, contributions: Sequence[Contribution]) -> torch.Tensor:
        """`codec.encode(weighted_mean(decoded payloads, weights))`, built chunk by chunk.

        Raises:
            ParticipantFailed: see the module docstring.
            ValueError: bad weights or rank order; a mean the codec cannot encode.
        """
        payload = new_payload(self.chunked, self.buffers)
        chunked = self.chunked
        self._run(contributions, lambda a, b: chunked.verbatim_view(payload, a, b), payload)
        return payload

    def mean_into(self, contributions: Sequence[Contribution], out_N: torch.Tensor) -> None:
        """Write `weighted_mean(decoded payloads, weights)` into `out_N` (fp32, numel).

        Raises:
            ParticipantFailed: see the module docstring (`out_N` then holds garbage).
            ValueError: bad weights or rank order, or an `out_N` of another shape.
        """
        if out_N.dtype != torch.float32 or out_N.shape != (self.numel,):
            raise ValueError(
                f"out_N must be fp32 of shape ({self.numel},), got {out_N.dtype} "
                f"{tuple(out_N.shape)}"
            )
        self._run(contributions, lambda a, b: out_N[a:b], None)

    def _run(
        self,
        contributions: Sequence[Contribution],
        target: Callable[[int, int], torch.Tensor | None],
        payload: torch.Tensor | None,
    ) -> None:
        """Accumulate chunk after chunk into `target(start, stop)` (None: a scratch buffer),
        each chunk then encoded into `payload` unless that is None."""
        alphas = mean_alphas(contributions)
        prefixes = [self._read_prefix(c) for c in contributions]
        # Where every prefix proves its values finite, a non-finite mean can only be their
        # sum's overflow, which the encoding refuses (ChunkCodec.encode_chunk): no pass to
        # check, and the sums and their encoding can be one (mean_chunk's encode_into).
        check_each_chunk = not (
            payload is not None and all(map(self.chunked.finite_by_prefix, prefixes))
        )
        encode_into = None if check_each_chunk else payload
        width = self.chunk_elements
        starts = range(0, self.numel, width)
        sizes = [self._section_bytes(a, min(a + width, self.numel)) for a in starts]
        kind = PrefetchedSections if self.prefetch else InlineSections
        streams = [kind(_reader_of(c), sizes) for c in contributions]
        scratch_n, acc_buffer_n = empty(width, torch.float32, _CPU), None
        try:
            for start in starts:
                stop = min(start + width, self.numel)
                acc_n = target(start, stop)
                if acc_n is None:
                    if acc_buffer_n is None:
                        acc_buffer_n = empty(width, torch.float32, _CPU)
                    acc_n = acc_buffer_n[: stop - start]
                wire = [stream.next() for stream in streams]
                try:
                    finite = self.chunked.mean_chunk(
                        prefixes, wire, start, alphas, acc_n, scratch_n=scratch_n[: stop - start],
                        encode_into=encode_into,
                    )  # fmt: skip
                except ContributionError as error:
                    rank = contributions[error.index].rank
                    raise ParticipantFailed(rank, "refused", str(error)) from None
                if check_each_chunk and not (all_finite(acc_n) if finite is None else finite):
                    self._blame_non_finite(contributions, prefixes, wire, start, scratch_n)
                for stream in streams:
                    stream.release()
                if payload is not None and check_each_chunk:
                    self.chunked.encode_chunk(acc_n, payload, start)
        finally:
            for stream in streams:
                stream.close()

    def _section_bytes(self, start: int, stop: int) -> int:
        return self.chunked.section_offset(stop) - self.chunked.section_offset(start)

    def _read_prefix(self, contribution: Contribution) -> torch.Tensor:
        prefix = empty(self.chunked.prefix_bytes, torch.uint8, _CPU)
        _read(contribution, prefix)
        try:
            self.chunked.check_prefix(prefix)
        except PayloadError as error:
            raise ParticipantFailed(contribution.rank, "refused", str(error)) from None
        return prefix

    def _blame_non_finite(
        self,
        contributions: Sequence[Contribution],
        prefixes: Sequence[torch.Tensor],
        wire: Sequence[torch.Tensor],
        start: int,
        scratch_n: torch.Tensor,
    ) -> None:
        """Raise for the first participant whose chunk decodes to a NaN or inf; the chunks'
        wire bytes are all still held, so each is decoded again."""
        count = min(self.chunk_elements, self.numel - start)
        for contribution, prefix, section in zip(contributions, prefixes, wire, strict=True):
            values_n = self.chunked.decode_chunk(prefix, section, start, scratch_n[:count])
            if not all_finite(values_n):
                bad = int((~torch.isfinite(values_n)).sum())
                raise ParticipantFailed(
                    contribution.rank,
                    "refused",
                    f"the payload holds {bad} non-finite value(s) (NaN or inf) in elements "
                    f"[{start}, {start + count})",
                )
        raise ValueError(f"the mean of finite payloads overflowed in elements from {start}")


def mean_alphas(contributions: Sequence[Contribution]) -> list[float]:
    """w_i / W for each participant, W summed in the given order as `weighted_mean` does.

    Raises:
        ValueError: no participant, ranks not strictly increasing, or a weight that is not
            a finite number > 0.
    """
    if not contributions:
        raise ValueError("nothing to average")
    ranks = [c.rank for c in contributions]
    if any(b <= a for a, b in zip(ranks, ranks[1:], strict=False)):
        raise ValueError(f"contributions must be in strictly increasing rank order, got {ranks}")
    weights = [c.weight for c in contributions]
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must be finite and > 0, got {weights}")
    total = float(sum(weights))
    return [weight / total for weight in weights]


def _reader_of(contribution: Contribution) -> Callable[[torch.Tensor], None]:
    return lambda buffer: _read(contribution, buffer)


def _read(contribution: Contribution, buffer: torch.Tensor) -> None:
    try:
        contribution.reader.read_into(buffer.numpy().data)
    except StreamError as error:
        raise ParticipantFailed(contribution.rank, error.reason, str(error)) from None
