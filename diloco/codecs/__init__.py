"""Codecs: how a pseudo-gradient is written on the wire (byte layouts: docs/codecs.md)."""

from collections.abc import Callable
from dataclasses import dataclass

from diloco.codecs.base import HEADER_BYTES, Codec, PayloadError
from diloco.codecs.floating import Bf16Codec, Fp16Codec, NoneCodec
from diloco.codecs.fp4 import E2M1, E3M0, Fp4Codec, Fp4Format
from diloco.codecs.fp8 import Fp8Codec
from diloco.codecs.int8 import Int8Codec
from diloco.codecs.topk import TopKCodec

# `fp4` is the 4-bit format that trained better here (docs/codecs.md, "Which fp4").
DEFAULT_FP4 = E2M1


@dataclass(frozen=True, kw_only=True)
class CodecOptions:
    """What a codec may be built with; each factory reads only what it needs."""

    block_size: int = 256
    """Elements per block: one fp32 scale each (int8, fp8, fp4), the unit of top-k selection."""
    topk_fraction: float = 0.1
    """Share of each block that topk sends."""


CODECS: dict[str, Callable[[CodecOptions], Codec]] = {
    "none": lambda options: NoneCodec(),
    "fp16": lambda options: Fp16Codec(),
    "bf16": lambda options: Bf16Codec(),
    "int8": lambda options: Int8Codec(options.block_size),
    "fp8": lambda options: Fp8Codec(options.block_size),
    "fp4": lambda options: Fp4Codec(DEFAULT_FP4, options.block_size),
    "fp4_e2m1": lambda options: Fp4Codec(E2M1, options.block_size),
    "fp4_e3m0": lambda options: Fp4Codec(E3M0, options.block_size),
    "topk": lambda options: TopKCodec(options.block_size, options.topk_fraction),
}


def build_codec(name: str, *, block_size: int = 256, topk_fraction: float = 0.1) -> Codec:
    """The codec registered under `name`.

    Raises:
        ValueError: an unknown name, or a block size or fraction the codec cannot use.
    """
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    return CODECS[name](CodecOptions(block_size=block_size, topk_fraction=topk_fraction))


__all__ = [
    "CODECS",
    "DEFAULT_FP4",
    "E2M1",
    "E3M0",
    "HEADER_BYTES",
    "Bf16Codec",
    "Codec",
    "CodecOptions",
    "Fp16Codec",
    "Fp4Codec",
    "Fp4Format",
    "Fp8Codec",
    "Int8Codec",
    "NoneCodec",
    "PayloadError",
    "TopKCodec",
    "build_codec",
]
