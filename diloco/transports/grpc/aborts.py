"""How a grpc call of the coordinator ends early: a status code and a one-line reason.

The codes the island's client turns into clear messages are listed in `service.py`.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from diloco.transports.grpc.guard import StreamWatch


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with `code` and `details` (grpc raises out of the handler)."""
    context.abort(code, details)
    raise AssertionError("abort raises")  # for the type checker


def end_if_cut(context: grpc.ServicerContext, watch: StreamWatch) -> None:
    """End a call whose stream the watchdog cut (its read ended early) as CANCELLED."""
    if watch.cut:
        abort(context, grpc.StatusCode.CANCELLED, "the stream was cut: idle or too slow")


def peer(context: Any) -> str:
    """Who called, for a log line (escaped)."""
    try:
        return repr(context.peer())
    except Exception:
        return "?"
