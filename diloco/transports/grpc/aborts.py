"""How a grpc call of the coordinator ends early: a status code and a one-line reason.

The codes the island's client turns into clear messages are listed in `service.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

import grpc

from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc.guard import StreamWatch, StreamWatchdog


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with `code` and `details` (grpc raises out of the handler)."""
    context.abort(code, details)
    raise AssertionError("abort raises")  # for the type checker


def end_if_cut(context: grpc.ServicerContext, watch: StreamWatch) -> None:
    """End a call whose stream the watchdog cut (its read ended early) as CANCELLED."""
    if watch.cut:
        abort(context, grpc.StatusCode.CANCELLED, "the stream was cut: idle or too slow")


def first_chunk(
    watchdog: StreamWatchdog,
    context: grpc.ServicerContext,
    chunks: Iterator[pb.Chunk],
    method: str,
    wait_s: float,
    kind: str,
) -> pb.Chunk:
    """A streaming call's first chunk, which must be its header of `kind`: read under the
    watchdog (a caller that sends nothing is cut after `wait_s`), else the call ends."""
    with watchdog.watch(context, method, wait_s, wait_s) as watch:
        first = next(chunks, None)
    end_if_cut(context, watch)
    if first is None or first.WhichOneof("kind") != kind:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{method} starts with a header")
    return first


def peer(context: Any) -> str:
    """Who called, for a log line (escaped)."""
    try:
        return repr(context.peer())
    except Exception:
        return "?"
