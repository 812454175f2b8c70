"""Codecs: how a pseudo-gradient is written on the wire."""

from collections.abc import Callable

from diloco.codecs.base import HEADER_BYTES, Codec, PayloadError
from diloco.codecs.floating import NoneCodec

CODECS: dict[str, Callable[[], Codec]] = {"none": NoneCodec}


def build_codec(name: str) -> Codec:
    """The codec registered under `name`."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    return CODECS[name]()


__all__ = ["CODECS", "HEADER_BYTES", "Codec", "NoneCodec", "PayloadError", "build_codec"]
