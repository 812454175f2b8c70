"""TLS for the data plane: Python `ssl` contexts from the run's certificate, key and CA.

The same PEM files as the grpc control plane (transport.grpc.tls_cert / tls_key / tls_ca /
mutual_tls; a self-signed pair: docs/transports.md), so a run has one identity. Islands check
the certificate against the CA (by default the certificate itself) and the name
`TLS_SERVER_NAME`, which every site's certificate carries, whatever address it is dialled at
(as the grpc transport does). TLS 1.2 at least.
"""

from __future__ import annotations

import ssl

from diloco.errors import ConfigError, existing_file

TLS_SERVER_NAME = "localhost"
_KEY = "transport.grpc"


def _existing(key: str, path: str) -> str:
    return str(existing_file(f"{_KEY}.{key}", path))


def _trust(context: ssl.SSLContext, key: str, path: str) -> None:
    """Trust the CA certificates in `path`, or say which key's file holds none."""
    try:
        context.load_verify_locations(_existing(key, path))
    except ssl.SSLError as error:
        raise ConfigError(
            f"{_KEY}.{key}: {path!r} holds no PEM certificate ({error.reason or error})"
        ) from None


def server_context(cert: str, key: str, *, ca: str = "", mutual: bool = False) -> ssl.SSLContext:
    """The coordinator's context: serve `cert`; with `mutual`, require islands to present a
    certificate signed by `ca` (default: `cert` itself).

    Raises:
        ConfigError: a missing file, or a certificate and key that do not load together.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(_existing("tls_cert", cert), _existing("tls_key", key))
    except ssl.SSLError as error:
        raise ConfigError(f"{_KEY}.tls_key: does not load with tls_cert: {error}") from None
    if mutual:
        context.verify_mode = ssl.CERT_REQUIRED
        _trust(context, "tls_ca" if ca else "tls_cert", ca or cert)
    return context


def client_context(
    ca: str, *, cert: str = "", key: str = "", ca_key: str = "tls_ca"
) -> ssl.SSLContext:
    """An island's context: trust `ca` (named by `ca_key`: tls_cert when the certificate is
    its own CA); present `cert` / `key` when the server requires mutual TLS.

    Raises:
        ConfigError: a missing file, or a certificate and key that do not load together.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _trust(context, ca_key, ca)
    if cert:
        try:
            context.load_cert_chain(_existing("tls_cert", cert), _existing("tls_key", key))
        except ssl.SSLError as error:
            raise ConfigError(f"{_KEY}.tls_key: does not load with tls_cert: {error}") from None
    return context
