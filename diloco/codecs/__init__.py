"""Codecs: how a pseudo-gradient is written on the wire (byte layouts: docs/codecs.md).

`registry.py` names them (`CODECS`, `build_codec`); `base.py` holds the `Codec` protocol and
the payload header; one module per family: `floating` (none, fp16, bf16), `int8`, `fp8`,
`fp4`, `topk`.
"""

from typing import TYPE_CHECKING

from diloco.lazy import lazy_exports

if TYPE_CHECKING:
    from diloco.codecs.base import HEADER_BYTES as HEADER_BYTES
    from diloco.codecs.base import Codec as Codec
    from diloco.codecs.base import PayloadError as PayloadError
    from diloco.codecs.floating import Bf16Codec as Bf16Codec
    from diloco.codecs.floating import Fp16Codec as Fp16Codec
    from diloco.codecs.floating import NoneCodec as NoneCodec
    from diloco.codecs.fp4 import DEFAULT_FP4 as DEFAULT_FP4
    from diloco.codecs.fp4 import E2M1 as E2M1
    from diloco.codecs.fp4 import E3M0 as E3M0
    from diloco.codecs.fp4 import Fp4Codec as Fp4Codec
    from diloco.codecs.fp4 import Fp4Format as Fp4Format
    from diloco.codecs.fp8 import Fp8Codec as Fp8Codec
    from diloco.codecs.int8 import Int8Codec as Int8Codec
    from diloco.codecs.registry import CODECS as CODECS
    from diloco.codecs.registry import CodecName as CodecName
    from diloco.codecs.registry import CodecOptions as CodecOptions
    from diloco.codecs.registry import build_codec as build_codec
    from diloco.codecs.topk import TopKCodec as TopKCodec

_EXPORTS = {
    "HEADER_BYTES": "diloco.codecs.base",
    "Codec": "diloco.codecs.base",
    "PayloadError": "diloco.codecs.base",
    "Bf16Codec": "diloco.codecs.floating",
    "Fp16Codec": "diloco.codecs.floating",
    "NoneCodec": "diloco.codecs.floating",
    "DEFAULT_FP4": "diloco.codecs.fp4",
    "E2M1": "diloco.codecs.fp4",
    "E3M0": "diloco.codecs.fp4",
    "Fp4Codec": "diloco.codecs.fp4",
    "Fp4Format": "diloco.codecs.fp4",
    "Fp8Codec": "diloco.codecs.fp8",
    "Int8Codec": "diloco.codecs.int8",
    "CODECS": "diloco.codecs.registry",
    "CodecName": "diloco.codecs.registry",
    "CodecOptions": "diloco.codecs.registry",
    "build_codec": "diloco.codecs.registry",
    "TopKCodec": "diloco.codecs.topk",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
