"""The codecs by name: what `outer.codec` may say, how each is built, which options it reads.

`CODECS` owns the names (`CodecName` must list the same ones: a test checks it). Each entry
imports its codec only when built, so the config loads without torch. Adding a codec: its
module, one `CodecName` member and one `CODECS` entry here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diloco.codecs.base import Codec


class CodecName(enum.Enum):
    none = "none"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"
    fp8 = "fp8"
    fp4 = "fp4"
    fp4_e2m1 = "fp4_e2m1"
    fp4_e3m0 = "fp4_e3m0"
    topk = "topk"


@dataclass(frozen=True, kw_only=True)
class CodecOptions:
    """What a codec may be built with; each entry reads only what `CodecEntry.reads` says."""

    block_size: int = 256
    """Elements per block: one fp32 scale each (int8, fp8, fp4), the unit of top-k selection."""
    topk_fraction: float = 0.1
    """Share of each block that topk sends."""


@dataclass(frozen=True)
class CodecEntry:
    build: Callable[[CodecOptions], Codec]
    reads: tuple[str, ...] = ()
    """The `CodecOptions` fields this codec uses (the others warn when set)."""


def _none(options: CodecOptions) -> Codec:
    from diloco.codecs.floating import NoneCodec

    return NoneCodec()


def _fp16(options: CodecOptions) -> Codec:
    from diloco.codecs.floating import Fp16Codec

    return Fp16Codec()


def _bf16(options: CodecOptions) -> Codec:
    from diloco.codecs.floating import Bf16Codec

    return Bf16Codec()


def _int8(options: CodecOptions) -> Codec:
    from diloco.codecs.int8 import Int8Codec

    return Int8Codec(options.block_size)


def _fp8(options: CodecOptions) -> Codec:
    from diloco.codecs.fp8 import Fp8Codec

    return Fp8Codec(options.block_size)


def _fp4(format_name: str) -> Callable[[CodecOptions], Codec]:
    def build(options: CodecOptions) -> Codec:
        from diloco.codecs import fp4

        return fp4.Fp4Codec(getattr(fp4, format_name), options.block_size)

    return build


def _topk(options: CodecOptions) -> Codec:
    from diloco.codecs.topk import TopKCodec

    return TopKCodec(options.block_size, options.topk_fraction)


_BLOCK = ("block_size",)
CODECS: dict[str, CodecEntry] = {
    "none": CodecEntry(_none),
    "fp16": CodecEntry(_fp16),
    "bf16": CodecEntry(_bf16),
    "int8": CodecEntry(_int8, _BLOCK),
    "fp8": CodecEntry(_fp8, _BLOCK),
    # `fp4` is the 4-bit format that trained better here (docs/codecs.md, "Which fp4").
    "fp4": CodecEntry(_fp4("DEFAULT_FP4"), _BLOCK),
    "fp4_e2m1": CodecEntry(_fp4("E2M1"), _BLOCK),
    "fp4_e3m0": CodecEntry(_fp4("E3M0"), _BLOCK),
    "topk": CodecEntry(_topk, ("block_size", "topk_fraction")),
}


def build_codec(name: str, *, block_size: int = 256, topk_fraction: float = 0.1) -> Codec:
    """The codec registered under `name`.

    Raises:
        ValueError: an unknown name, or a block size or fraction the codec cannot use.
    """
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    return CODECS[name].build(CodecOptions(block_size=block_size, topk_fraction=topk_fraction))


def ignored_codec_options(name: str, options: CodecOptions) -> dict[str, str]:
    """The options set to non-defaults that codec `name` never reads, each with the codecs
    that read it."""
    default = CodecOptions()
    return {
        key: "read only by outer.codec=" + "|".join(c for c in CODECS if key in CODECS[c].reads)
        for key in ("block_size", "topk_fraction")
        if key not in CODECS[name].reads and getattr(options, key) != getattr(default, key)
    }
