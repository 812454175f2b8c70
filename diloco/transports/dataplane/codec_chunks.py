"""Codec payloads read and written one block-aligned chunk of elements at a time.

Every codec's payload is a header, then a part that describes the whole tensor at once, then
a part laid out element by element; this module calls them the *prefix* (read whole before
streaming: the header, plus the block scales of int8 / fp8 / fp4, or topk's fp16 values) and
the *section* (streamed: the codes of elements [start, stop) are one contiguous byte range).
Layouts: diloco/codecs/* and docs/codecs.md.

    codec            prefix                     section bytes of elements [a, b)
    none/fp16/bf16   header                     itemsize * (b - a)
    int8, fp8        header | scale fp32[nb]    b - a
    fp4              header | scale fp32[nb]    ceil(b / 2) - a / 2   (a even)
    topk             header | values fp16[K]    index bytes * (kept before b - kept before a)

Chunks start on a multiple of `alignment` (whole blocks; for fp4 also whole bytes). Decoding
and encoding a chunk call the codecs' own functions (the fused CPU kernels where the codec
uses them) on chunk-sized views, so every element gets the same bits as a whole-tensor
`codec.decode` / `codec.encode`: each is computed within its block alone.

Shape suffixes: `_n` elements of one chunk, `_nb` blocks.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Protocol

import torch

from diloco.codecs import cpu_kernels, sum_kernels
from diloco.codecs.base import (
    DTYPE_FP8_E4M3,
    DTYPE_FP16,
    DTYPE_IDS,
    DTYPE_INT8,
    HEADER_BYTES,
    Codec,
    Header,
    PayloadError,
    all_finite,
    empty,
    flat_fp32,
    num_blocks,
    pack_header,
    refuse_non_finite_scales,
    runs_fused,
    scales_are_valid,
    scales_from_body,
)
from diloco.codecs.floating import Bf16Codec, Fp16Codec, NoneCodec
from diloco.codecs.fp4 import Fp4Codec, fp4_decode, fp4_encode
from diloco.codecs.fp8 import Fp8Codec, fp8_decode, fp8_encode
from diloco.codecs.int8 import Int8Codec, int8_decode, int8_encode
from diloco.codecs.topk import TopKCodec, topk_decode, topk_encode, topk_sizes
from diloco.transports.dataplane.buffers import ReusedBuffers

_FP32_MAX = float(torch.finfo(torch.float32).max)
_CHECK_ELEMENTS = 1 << 20
"""Elements `decodes_finite` decodes at a time."""
# The header layout of diloco/codecs/base.py, parsed only to explain a mismatch.
_HEADER = struct.Struct("<4sBBBxIQ")


class ChunkCodec(Protocol):
    """One codec's payload of `numel` elements, chunk by chunk."""

    name: str
    numel: int
    alignment: int
    """Chunk starts are multiples of this many elements."""
    prefix_bytes: int
    payload_bytes: int

    def section_offset(self, element: int) -> int:
        """Bytes of the section before `element` (a multiple of `alignment`, or `numel`)."""
        ...

    def check_prefix(self, prefix: torch.Tensor) -> None:
        """Raise PayloadError unless the prefix is this codec's for `numel` elements."""
        ...

    def finite_by_prefix(self, prefix: torch.Tensor) -> bool:
        """Whether a checked prefix alone proves that every element decodes to a finite value
        (int8 / fp4: every code's magnitude times the largest scale stays within fp32; topk:
        the kept values are finite); False where only the section can tell (none, fp16,
        bf16, and fp8, whose codes include NaN). Reading only the prefix costs O(N / B)."""
        ...

    def decode_chunk(
        self, prefix: torch.Tensor, section: torch.Tensor, start: int, scratch_n: torch.Tensor
    ) -> torch.Tensor:
        """The fp32 values of elements [start, start + len(scratch_n)): written into
        `scratch_n`, or a view of `section` where the wire holds them verbatim (none)."""
        ...

    def mean_chunk(
        self,
        prefixes: Sequence[torch.Tensor],
        sections: Sequence[torch.Tensor],
        start: int,
        alphas: Sequence[float],
        acc_n: torch.Tensor,
        *,
        scratch_n: torch.Tensor,
        encode_into: torch.Tensor | None = None,
    ) -> bool | None:
        """acc_n = sum_k alphas[k] * (the values of contribution k's elements [start, start +
        len(acc_n))), bit for bit what `acc_n.zero_()` then `acc_n.add_(values_k,
        alpha=alphas[k])` for k = 0, 1, ... write; `scratch_n` (as long) may take decoded
        values. With `encode_into` (a payload buffer), encode_chunk of the sums into it too,
        bit for bit; acc_n may then be left as it was (int8 encodes the sums as it forms
        them). True or False: whether every sum is finite, where that came free; None
        otherwise.

        Raises:
            ContributionError: contribution k's section is not this codec's (k named).
            ValueError: sums the codec cannot encode (as encode_chunk).
        """
        ...

    def encode_chunk(self, x_n: torch.Tensor, payload: torch.Tensor, start: int) -> None:
        """Write the encoding of elements [start, start + len(x_n)) into `payload` (the whole
        payload buffer). ValueError for values the codec cannot hold (beyond fp16's range).
        The accumulator checks `x_n` is finite before (to blame a participant), except where
        every contribution's prefix proved its values finite (`finite_by_prefix`): then only
        an overflow of their sum can put an inf in `x_n`, and every codec whose prefix can
        prove it (int8, fp4, topk) refuses an inf with ValueError."""
        ...

    def verbatim_view(self, payload: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        """Where the payload holds elements [start, stop) as plain fp32 (codec none), so a mean
        can be accumulated in place; None for every other codec."""
        ...


def chunk_codec(codec: Codec, numel: int) -> ChunkCodec:
    """The chunked form of `codec` for tensors of `numel` elements.

    Raises:
        ValueError: a codec this module does not know (decode it whole instead).
    """
    chunked: ChunkCodec
    if isinstance(codec, NoneCodec | Fp16Codec | Bf16Codec):
        chunked = _CastChunks(codec, numel)
    elif isinstance(codec, Int8Codec | Fp8Codec | Fp4Codec):
        chunked = _BlockChunks(codec, numel)
    elif isinstance(codec, TopKCodec):
        chunked = _TopKChunks(codec, numel)
    else:
        raise ValueError(f"codec {codec.name!r} has no chunked form in the data plane")
    assert chunked.payload_bytes == codec.payload_bytes(numel), codec.name
    return chunked


def decode_view(codec: Codec, payload: torch.Tensor, numel: int) -> torch.Tensor:
    """`codec.decode(payload, numel)`, except that a `none` payload's values are a view of its
    body (no fp32 copy of the whole vector) after its header is checked. The caller must not
    change the payload while the values are in use.

    Raises:
        PayloadError: as `codec.decode`.
    """
    body = payload[HEADER_BYTES:]
    if not isinstance(codec, NoneCodec) or payload.device.type != "cpu" or body.data_ptr() % 4:
        return codec.decode(payload, numel)
    chunked = _CastChunks(codec, numel)
    if payload.numel() != chunked.payload_bytes:
        raise PayloadError(
            f"none payload of {payload.numel()} bytes, expected {chunked.payload_bytes}"
        )
    chunked.check_prefix(payload)
    return body.view(torch.float32)


def decode_into(
    codec: Codec, payload: torch.Tensor, numel: int, out_N: torch.Tensor | None
) -> torch.Tensor:
    """`decode_view(codec, payload, numel)`, decoded into `out_N` where a copy is needed and
    `out_N` can take it (a contiguous fp32 CPU tensor of `numel` values): bit for bit
    `codec.decode`, in memory already mapped.

    Raises:
        PayloadError: as `codec.decode`.
    """
    if (
        out_N is None
        or isinstance(codec, NoneCodec)
        or payload.device.type != "cpu"
        or out_N.device.type != "cpu"
        or out_N.dtype != torch.float32
        or out_N.shape != (numel,)
        or not out_N.is_contiguous()
    ):
        return decode_view(codec, payload, numel)
    try:
        chunked = chunk_codec(codec, numel)
    except ValueError:  # a plugin's codec
        return codec.decode(payload, numel)
    if payload.numel() != chunked.payload_bytes:
        raise PayloadError(
            f"{codec.name} payload of {payload.numel()} bytes, expected {chunked.payload_bytes}"
        )
    prefix = payload[: chunked.prefix_bytes]
    chunked.check_prefix(prefix)
    values_N = chunked.decode_chunk(prefix, payload[chunked.prefix_bytes :], 0, out_N)
    if values_N.data_ptr() != out_N.data_ptr():
        out_N.copy_(values_N)
    return out_N


def decodes_finite(codec: Codec, payload: torch.Tensor, numel: int) -> bool:
    """Whether `payload` decodes (this codec, `numel` elements) to finite values only, read a
    chunk at a time (at most `_CHECK_ELEMENTS` fp32 values in memory); False for a payload
    that does not decode."""
    try:
        chunked = chunk_codec(codec, numel)
    except ValueError:  # a plugin's codec: decoded whole
        try:
            return all_finite(codec.decode(payload, numel))
        except (PayloadError, ValueError):
            return False
    if payload.numel() != chunked.payload_bytes:
        return False
    prefix = payload[: chunked.prefix_bytes]
    step = math.lcm(chunked.alignment, 64) * max(
        1, _CHECK_ELEMENTS // math.lcm(chunked.alignment, 64)
    )
    scratch_n = empty(min(step, numel), torch.float32, payload.device)
    try:
        chunked.check_prefix(prefix)
        if chunked.finite_by_prefix(prefix):
            return True
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            begin = chunked.prefix_bytes + chunked.section_offset(start)
            section = payload[begin : chunked.prefix_bytes + chunked.section_offset(stop)]
            values_n = chunked.decode_chunk(prefix, section, start, scratch_n[: stop - start])
            if not all_finite(values_n):
                return False
    except (PayloadError, ValueError):
        return False
    return True


def new_payload(chunked: ChunkCodec, buffers: ReusedBuffers | None = None) -> torch.Tensor:
    """An empty payload buffer with its header written, for `encode_chunk` to fill (taken
    from `buffers` when given)."""
    if buffers is None:
        payload = empty(chunked.payload_bytes, torch.uint8, torch.device("cpu"))
    else:
        payload = buffers.take(chunked.payload_bytes)
    payload[:HEADER_BYTES] = pack_header(_expected_header(chunked), torch.device("cpu"))
    return payload


def _expected_header(chunked: ChunkCodec) -> Header:
    assert isinstance(chunked, _CastChunks | _BlockChunks | _TopKChunks)
    return chunked.header


def _check_header(prefix: torch.Tensor, expected: Header, name: str) -> None:
    got = bytes(prefix[:HEADER_BYTES].numpy().tobytes())
    if got == bytes(pack_header(expected, torch.device("cpu")).numpy().tobytes()):
        return
    magic, version, codec_id, dtype_id, block, numel = _HEADER.unpack(got)
    raise PayloadError(
        f"{name} payload header (magic {magic!r}, version {version}, codec {codec_id}, dtype "
        f"{dtype_id}, block {block}, numel {numel}) does not match the expected {expected}"
    )


class ContributionError(PayloadError):
    """Contribution `index` of a mean_chunk call holds what its codec refuses."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class _DecodeThenAdd:
    """`ChunkCodec.mean_chunk`: in one pass where the codec has one-pass sums (`one_pass`) and
    they write what torch writes here (`_sums_in_one_pass`), else in torch: each
    contribution decoded into the scratch, then added (the first after zeroing)."""

    one_pass = False
    """Whether `_mean_in_one_pass` serves this codec (int8, and fp32: codec none)."""

    def mean_chunk(
        self,
        prefixes: Sequence[torch.Tensor],
        sections: Sequence[torch.Tensor],
        start: int,
        alphas: Sequence[float],
        acc_n: torch.Tensor,
        *,
        scratch_n: torch.Tensor,
        encode_into: torch.Tensor | None = None,
    ) -> bool | None:
        if self.one_pass and _sums_in_one_pass(acc_n, sections):
            return self._mean_in_one_pass(prefixes, sections, start, alphas, acc_n, encode_into)
        for k, (prefix, section, alpha) in enumerate(zip(prefixes, sections, alphas, strict=True)):
            try:
                values_n = self.decode_chunk(prefix, section, start, scratch_n)
            except PayloadError as error:
                raise ContributionError(k, str(error)) from None
            if k == 0:
                acc_n.zero_()
            acc_n.add_(values_n, alpha=alpha)
        if encode_into is not None:
            self.encode_chunk(acc_n, encode_into, start)
        return None

    def _mean_in_one_pass(
        self,
        prefixes: Sequence[torch.Tensor],
        sections: Sequence[torch.Tensor],
        start: int,
        alphas: Sequence[float],
        acc_n: torch.Tensor,
        encode_into: torch.Tensor | None,
    ) -> bool | None:
        raise NotImplementedError  # the classes that set one_pass have their own

    def decode_chunk(
        self, prefix: torch.Tensor, section: torch.Tensor, start: int, scratch_n: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError  # each codec's class has its own

    def encode_chunk(self, x_n: torch.Tensor, payload: torch.Tensor, start: int) -> None:
        raise NotImplementedError  # each codec's class has its own


class _CastChunks(_DecodeThenAdd):
    def __init__(self, codec: NoneCodec | Fp16Codec | Bf16Codec, numel: int):
        self.dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            codec.name
        ]
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.name, self.numel, self.alignment = codec.name, numel, 1
        self.one_pass = self.dtype == torch.float32
        self.header = Header(codec.codec_id, DTYPE_IDS[self.dtype], 0, numel)
        self.prefix_bytes = HEADER_BYTES
        self.payload_bytes = HEADER_BYTES + self.itemsize * numel

    def section_offset(self, element: int) -> int:
        return self.itemsize * element

    def check_prefix(self, prefix: torch.Tensor) -> None:
        _check_header(prefix, self.header, self.name)

    def finite_by_prefix(self, prefix: torch.Tensor) -> bool:
        return False

    def decode_chunk(
        self, prefix: torch.Tensor, section: torch.Tensor, start: int, scratch_n: torch.Tensor
    ) -> torch.Tensor:
        wire_n = section.view(self.dtype)
        if self.dtype == torch.float32:
            return wire_n
        scratch_n.copy_(wire_n)
        return scratch_n

    def _mean_in_one_pass(
        self,
        prefixes: Sequence[torch.Tensor],
        sections: Sequence[torch.Tensor],
        start: int,
        alphas: Sequence[float],
        acc_n: torch.Tensor,
        encode_into: torch.Tensor | None,
    ) -> bool | None:
        # fp32: every contribution added in one pass, each block's sums in L1
        # (sum_kernels.f32_weighted_sum_into), which also says whether they are all finite.
        values = [section.view(torch.float32) for section in sections]
        finite = sum_kernels.f32_weighted_sum_into(acc_n, values, alphas)
        if encode_into is not None:
            self.encode_chunk(acc_n, encode_into, start)
        return finite

    def encode_chunk(self, x_n: torch.Tensor, payload: torch.Tensor, start: int) -> None:
        begin = HEADER_BYTES + self.itemsize * start
        wire_n = payload[begin : begin + self.itemsize * x_n.numel()].view(self.dtype)
        if wire_n.data_ptr() != x_n.data_ptr():
            wire_n.copy_(x_n)
        if self.dtype != torch.float32 and not all_finite(wire_n):
            raise ValueError(
                f"{self.name} codec cannot encode values beyond {torch.finfo(self.dtype).max:g}"
            )

    def verbatim_view(self, payload: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        if self.dtype != torch.float32:
            return None
        return payload[HEADER_BYTES + 4 * start : HEADER_BYTES + 4 * stop].view(torch.float32)


class _BlockChunks(_DecodeThenAdd):
    """int8, fp8 and fp4: an fp32 scale per block in the prefix, codes in the section."""

    def __init__(self, codec: Int8Codec | Fp8Codec | Fp4Codec, numel: int):
        self.codec, self.name, self.numel = codec, codec.name, numel
        self.block = codec.block_size
        self.nb = num_blocks(numel, self.block)
        self.half_bytes = isinstance(codec, Fp4Codec)  # two codes per byte
        self.one_pass = isinstance(codec, Int8Codec)
        self.alignment = math.lcm(self.block, 2) if self.half_bytes else self.block
        if isinstance(codec, Fp4Codec):
            dtype_id = codec.fmt.dtype_id
        else:
            dtype_id = DTYPE_INT8 if isinstance(codec, Int8Codec) else DTYPE_FP8_E4M3
        self.header = Header(codec.codec_id, dtype_id, self.block, numel)
        self.prefix_bytes = HEADER_BYTES + 4 * self.nb
        self.payload_bytes = self.prefix_bytes + self.section_offset(numel)

    def section_offset(self, element: int) -> int:
        return (element + 1) // 2 if self.half_bytes else element

    def check_prefix(self, prefix: torch.Tensor) -> None:
        _check_header(prefix, self.header, self.name)
        scales_from_body(prefix[HEADER_BYTES:], self.nb, self.name)

    def finite_by_prefix(self, prefix: torch.Tensor) -> bool:
        if self.nb == 0:
            return True
        if isinstance(self.codec, Fp8Codec):
            return False
        # A value is one product code x scale, rounded once in fp32 (both decoders): below
        # fp32's largest finite value exactly, it rounds to at most that value. The scales
        # were checked (finite, >= 0) with the prefix.
        largest = 128.0 if isinstance(self.codec, Int8Codec) else max(self.codec.fmt.magnitudes)
        scale_nb = self._scales(prefix, 0, self.numel)
        return float(scale_nb.cpu().numpy().max()) * largest <= _FP32_MAX

    def _scales(self, buffer: torch.Tensor, start: int, count: int) -> torch.Tensor:
        b0, b1 = start // self.block, num_blocks(start + count, self.block)
        return buffer[HEADER_BYTES + 4 * b0 : HEADER_BYTES + 4 * b1].view(torch.float32)

    def decode_chunk(
        self, prefix: torch.Tensor, section: torch.Tensor, start: int, scratch_n: torch.Tensor
    ) -> torch.Tensor:
        count, codec = scratch_n.numel(), self.codec
        scale_nb = self._scales(prefix, start, count)
        fused = runs_fused(section)
        if isinstance(codec, Int8Codec):
            q_n = section.view(torch.int8)
            if fused:
                cpu_kernels.int8_decode_into(q_n, scale_nb, scratch_n, self.block)
            else:
                scratch_n.copy_(int8_decode(q_n, scale_nb, self.block))
        elif isinstance(codec, Fp8Codec):
            scratch_n.copy_(fp8_decode(section.view(torch.float8_e4m3fn), scale_nb, self.block))
        elif fused:
            mags = codec.fmt.magnitudes
            cpu_kernels.fp4_decode_into(section, scale_nb, scratch_n, self.block, mags)
        else:
            scratch_n.copy_(fp4_decode(section, scale_nb, count, self.block, codec.fmt))
        return scratch_n

    def _mean_in_one_pass(
        self,
        prefixes: Sequence[torch.Tensor],
        sections: Sequence[torch.Tensor],
        start: int,
        alphas: Sequence[float],
        acc_n: torch.Tensor,
        encode_into: torch.Tensor | None,
    ) -> bool | None:
        # int8: every contribution decoded and added in one pass, each block's sums in L1
        # (sum_kernels.int8_weighted_sum_into), and with a payload to fill, encoded as they
        # are formed, never written (int8_weighted_sum_encode_into). A non-finite sum (an
        # overflow) is refused as encode_chunk refuses it, with its count: the sums are then
        # written and encoded apart.
        count = acc_n.numel()
        q_ns = [section.view(torch.int8) for section in sections]
        scale_nbs = [self._scales(prefix, start, count) for prefix in prefixes]
        if encode_into is not None and runs_fused(encode_into):
            mean_scale_nb = self._scales(encode_into, start, count)
            mean_q_n = self._codes(encode_into, start, count).view(torch.int8)
            sum_kernels.int8_weighted_sum_encode_into(
                q_ns, scale_nbs, self.block, alphas, mean_q_n, mean_scale_nb
            )
            if scales_are_valid(mean_scale_nb):
                return None
        finite = sum_kernels.int8_weighted_sum_into(acc_n, q_ns, scale_nbs, self.block, alphas)
        if encode_into is not None:
            self.encode_chunk(acc_n, encode_into, start)
        return finite

    def _codes(self, payload: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """The bytes of elements [start, start + count) in a payload's section."""
        begin = self.prefix_bytes + self.section_offset(start)
        return payload[begin : self.prefix_bytes + self.section_offset(start + count)]

    def encode_chunk(self, x_n: torch.Tensor, payload: torch.Tensor, start: int) -> None:
        count, codec = x_n.numel(), self.codec
        scale_nb = self._scales(payload, start, count)
        codes = self._codes(payload, start, count)
        if isinstance(codec, Fp8Codec):
            e_n, s_nb = fp8_encode(flat_fp32(x_n, self.name), self.block)
            codes.copy_(e_n.view(torch.uint8))
            scale_nb.copy_(s_nb)
            return
        x_n = x_n.contiguous()
        if isinstance(codec, Int8Codec):
            if runs_fused(x_n):
                cpu_kernels.int8_encode_into(x_n, codes.view(torch.int8), scale_nb, self.block)
            else:
                q_n, s_nb = int8_encode(x_n, self.block)
                codes.view(torch.int8).copy_(q_n)
                scale_nb.copy_(s_nb)
        elif runs_fused(x_n):
            cpu_kernels.fp4_encode_into(x_n, codes, scale_nb, self.block, codec.fmt.magnitudes)
        else:
            packed, s_nb = fp4_encode(x_n, self.block, codec.fmt)
            codes.copy_(packed)
            scale_nb.copy_(s_nb)
        refuse_non_finite_scales(scale_nb, x_n, self.name)

    def verbatim_view(self, payload: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        return None


class _TopKChunks(_DecodeThenAdd):
    """topk: the fp16 values of all blocks in the prefix, their indices in the section."""

    def __init__(self, codec: TopKCodec, numel: int):
        self.codec, self.name, self.numel = codec, codec.name, numel
        self.block, self.alignment = codec.block_size, codec.block_size
        self.header = Header(codec.codec_id, DTYPE_FP16, self.block, numel)
        self.kept = codec.kept(numel)
        self.prefix_bytes = HEADER_BYTES + 2 * self.kept
        self.payload_bytes = self.prefix_bytes + codec.index_bytes * self.kept

    def _kept_before(self, element: int) -> int:
        if element >= self.numel:
            return self.kept
        return (element // self.block) * topk_sizes(self.numel, self.block, self.codec.fraction)[1]

    def section_offset(self, element: int) -> int:
        return self.codec.index_bytes * self._kept_before(element)

    def check_prefix(self, prefix: torch.Tensor) -> None:
        _check_header(prefix, self.header, self.name)

    def finite_by_prefix(self, prefix: torch.Tensor) -> bool:
        # Every decoded value is a kept fp16 value or zero.
        return all_finite(self._values(prefix, 0, self.numel))

    def _values(self, buffer: torch.Tensor, start: int, count: int) -> torch.Tensor:
        k0, k1 = self._kept_before(start), self._kept_before(start + count)
        return buffer[HEADER_BYTES + 2 * k0 : HEADER_BYTES + 2 * k1].view(torch.float16)

    def decode_chunk(
        self, prefix: torch.Tensor, section: torch.Tensor, start: int, scratch_n: torch.Tensor
    ) -> torch.Tensor:
        count, codec = scratch_n.numel(), self.codec
        raw = section.to(torch.int64)
        indices = raw if codec.index_bytes == 1 else raw[0::2] | (raw[1::2] << 8)
        values = self._values(prefix, start, count)
        scratch_n.copy_(topk_decode(values, indices, count, self.block, codec.fraction))
        return scratch_n

    def encode_chunk(self, x_n: torch.Tensor, payload: torch.Tensor, start: int) -> None:
        count, codec = x_n.numel(), self.codec
        values_K, indices_K = topk_encode(flat_fp32(x_n, self.name), self.block, codec.fraction)
        half_K = values_K.to(torch.float16)
        if not all_finite(half_K):
            raise ValueError(f"topk codec cannot encode values beyond fp16's range ({codec.name})")
        self._values(payload, start, count).copy_(half_K)
        begin = self.prefix_bytes + self.section_offset(start)
        section = payload[begin : self.prefix_bytes + self.section_offset(start + count)]
        if codec.index_bytes == 1:
            section.copy_(indices_K.to(torch.uint8))
        else:
            low, high = (indices_K & 0xFF).to(torch.uint8), (indices_K >> 8).to(torch.uint8)
            section.copy_(torch.stack([low, high], dim=1).reshape(-1))

    def verbatim_view(self, payload: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        return None


def _sums_in_one_pass(acc_n: torch.Tensor, sections: Sequence[torch.Tensor]) -> bool:
    """Whether the one-pass weighted sums of sum_kernels run here and write what torch's
    zero_() then add_() write (`fma_add_matches_torch`, measured once per process)."""
    return (
        acc_n.device.type == "cpu"
        and all(runs_fused(section) for section in sections)
        and sum_kernels.fma_add_matches_torch()
    )
