"""How an island's calls to the coordinator are retried, and which failures are final.

A coordinator that is down, restarting, busy or not ready for a call yet is retried with
bounded exponential backoff (0.2 s doubling to 5 s, with jitter) for transport.grpc.retry_s;
a coordinator that forgot this island (it restarted) is joined again first. A refusal (wrong
token, another model, a refused payload, a TLS mismatch) ends the retries at once with one
line saying what to fix.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from diloco.errors import ConfigError
from diloco.transports.base import GroupMismatchError
from diloco.transports.grpc.config import GrpcTransportConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# Worth retrying: the coordinator is down, restarting, busy or not ready for this call yet,
# or it cut a stream that moved no bytes for transport.grpc.stream_idle_s (CANCELLED: this
# island was too slow for a moment; the same call gets the same answer).
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


class PayloadRefusedError(RuntimeError):
    """The coordinator refused this island's payload (malformed or non-finite)."""


def retrying(
    settings: GrpcTransportConfig, what: str, call: Callable[[], T], rejoin: Callable[[], None]
) -> T:
    """`call`, retried with backoff while the coordinator is unreachable or not ready;
    `rejoin` joins again (quietly) when the coordinator no longer knows this island."""
    deadline = time.monotonic() + settings.retry_s
    delay = 0.2
    closed_on_connect = 0
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            details = (error.details() if hasattr(error, "details") else str(error)) or ""
            if code == grpc.StatusCode.UNAUTHENTICATED and "join first" in details:
                rejoin()  # the coordinator forgot this island (restarted)
                code = grpc.StatusCode.UNAVAILABLE
            raise_permanent(settings, code, details, what)
            # A TLS server closes a plaintext connection at once; a coordinator that is down
            # refuses it instead.
            closed_on_connect = closed_on_connect + 1 if "Socket closed" in details else 0
            if settings.insecure and closed_on_connect >= 3:
                raise ConfigError(
                    f"the coordinator at {settings.address} closes plaintext connections: it "
                    "requires TLS; set transport.grpc.tls_cert and tls_key (and drop "
                    "transport.grpc.insecure)"
                ) from None
            if time.monotonic() + delay > deadline:
                raise ConnectionError(
                    f"the coordinator at {settings.address} did not answer for "
                    f"{settings.retry_s:.0f} s while {what} (last error: {details}); is it "
                    "running, and are transport.grpc.address and TLS right?"
                ) from None
            if "has not joined" in details:
                rejoin()
            log.warning("%s: %s; retrying in %.1f s", what, details, delay)
            time.sleep(delay * (1 + 0.2 * random.random()))
            delay = min(delay * 2, 5.0)


def raise_permanent(
    settings: GrpcTransportConfig, code: grpc.StatusCode | None, details: str, what: str
) -> None:
    """Raise the error a final status code means; return for one worth retrying."""
    address = settings.address
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise ConfigError(
            f"the coordinator at {address} refused the run token while {what}: every site "
            f"needs the same ${settings.token_env} (or transport.grpc.token_file)"
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        raise GroupMismatchError(f"the coordinator at {address} refused: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise PayloadRefusedError(f"the coordinator at {address} refused: {details}")
    if code == grpc.StatusCode.UNAVAILABLE and _tls_mismatch(details):
        raise ConfigError(
            f"cannot reach the coordinator at {address} over TLS ({details}): check "
            "transport.grpc.tls_cert / tls_ca, and that both sides use TLS"
        )
    if code is not None and code not in _TRANSIENT:
        raise RuntimeError(f"the coordinator at {address} failed while {what}: {details}")


def _tls_mismatch(details: str) -> bool:
    text = (details or "").lower()
    return any(word in text for word in ("ssl", "tls", "handshake", "certificate", "wrong version"))
