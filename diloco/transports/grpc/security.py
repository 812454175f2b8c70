"""The grpc transport's security: a run token on every call, TLS (optionally mutual).

The token authenticates sites that share a run; TLS keeps it and the payloads private on the
wire. Every call after Join also carries the caller's rank and session (`call_metadata`), and
every call of an island's other lanes names its lane (`x-diloco-lane`, grpc/lanes.py). The
token is read from a file or an environment variable and never logged or written to outputs.
A self-signed pair for a run (docs/transports.md):

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj /CN=diloco -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout run.key -out run.crt
"""

from __future__ import annotations

import hmac
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from diloco.errors import ConfigError, existing_file, read_text_file
from diloco.transports.grpc.config import GrpcTransportConfig

TOKEN_METADATA_KEY = "authorization"
RANK_METADATA_KEY = "x-diloco-rank"
SESSION_METADATA_KEY = "x-diloco-session"
LANE_METADATA_KEY = "x-diloco-lane"
"""Absent (or empty) for the main lane."""
# Everyone in a run shares one certificate name, whatever address they dial.
TLS_TARGET_NAME = "localhost"


def self_signed_pair(directory: Path, days: int = 1) -> tuple[Path, Path]:
    """(run.crt, run.key) in `directory`, made with the one-liner above (tests, benches and a
    first try on loopback; a real run's pair is made once and copied to every site)."""
    cert, key = directory / "run.crt", directory / "run.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", str(days), "-subj", "/CN=diloco",
            "-addext", f"subjectAltName=DNS:{TLS_TARGET_NAME},IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def read_token(settings: GrpcTransportConfig) -> str:
    """The run token, from grpc.token_file or the grpc.token_env variable."""
    if settings.token_file:
        token = read_text_file("transport.grpc.token_file", settings.token_file).strip()
        where = f"the file {settings.token_file!r}"
    else:
        token = os.environ.get(settings.token_env, "").strip()
        where = f"${settings.token_env}"
    if not token:
        raise ConfigError(
            f"no run token: {where} is empty. Every site of a run needs the same secret, e.g. "
            f"export {settings.token_env}=$(openssl rand -hex 32), or set "
            "transport.grpc.token_file"
        )
    if len(token) < 16:
        raise ConfigError(f"the run token in {where} is too short: use at least 16 characters")
    return token


def _read_pem(key: str, path: str) -> bytes:
    return existing_file(f"transport.grpc.{key}", path).read_bytes()


def _read_ca(settings: GrpcTransportConfig) -> bytes:
    """The CA islands and the coordinator trust: tls_ca, by default the certificate itself
    (a missing file is named by the key that gave it)."""
    if settings.tls_ca:
        return _read_pem("tls_ca", settings.tls_ca)
    return _read_pem("tls_cert", settings.tls_cert)


def _refuse_plaintext(settings: GrpcTransportConfig) -> None:
    if not settings.tls_cert and not settings.insecure:
        raise ConfigError(
            "the grpc transport needs TLS: set transport.grpc.tls_cert and tls_key (a "
            "self-signed pair: docs/transports.md), or transport.grpc.insecure=true for a "
            "loopback experiment"
        )


def server_credentials(settings: GrpcTransportConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the coordinator; None for plaintext (grpc.insecure only)."""
    _refuse_plaintext(settings)
    if not settings.tls_cert:
        return None
    key = _read_pem("tls_key", settings.tls_key)
    cert = _read_pem("tls_cert", settings.tls_cert)
    ca = _read_ca(settings)
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca if settings.mutual_tls else None,
        require_client_auth=settings.mutual_tls,
    )


def channel_credentials(settings: GrpcTransportConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for an island's channel; None for plaintext (grpc.insecure only)."""
    _refuse_plaintext(settings)
    if not settings.tls_cert:
        return None
    ca = _read_ca(settings)
    if not settings.mutual_tls:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=_read_pem("tls_key", settings.tls_key),
        certificate_chain=_read_pem("tls_cert", settings.tls_cert),
    )


def token_metadata(token: str, lane: str = "") -> tuple[tuple[str, str], ...]:
    """What Join carries: the token, and the lane it joins (none for the main lane)."""
    lane_entry = ((LANE_METADATA_KEY, lane),) if lane else ()
    return ((TOKEN_METADATA_KEY, f"Bearer {token}"), *lane_entry)


def call_metadata(
    token: str, rank: int, session: str, lane: str = ""
) -> tuple[tuple[str, str], ...]:
    """What every call but Join and Status carries: the token, the rank and its session (and
    the lane, but for the main one)."""
    return (
        *token_metadata(token, lane),
        (RANK_METADATA_KEY, str(rank)),
        (SESSION_METADATA_KEY, session),
    )


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call whose `authorization` metadata is not this run's token."""

    def __init__(self, token: str, on_refused: Callable[[str], None]):
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        presented = str(metadata.get(TOKEN_METADATA_KEY, "")).encode()
        # compare_digest: the time taken says nothing about how much of the token matched.
        if hmac.compare_digest(presented, self._expected):
            return continuation(handler_call_details)
        self._on_refused(handler_call_details.method)
        handler = continuation(handler_call_details)
        return None if handler is None else _refusing_like(handler)


def _refuse(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing run token")


def _refusing_like(handler: Any) -> Any:
    """A handler of the same streaming shape as `handler` that refuses the call."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse)
    return grpc.unary_unary_rpc_method_handler(_refuse)
