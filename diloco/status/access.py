"""Who may read the status server: the listen address, loopback detection, the bearer token.

The policy itself (loopback by default and open there; anywhere else only with the run token
in `Authorization: Bearer`) and why are in diloco/status/server.py's docstring. Bearer tokens:
RFC 6750, https://www.rfc-editor.org/rfc/rfc6750.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import threading
from urllib.parse import urlsplit

from diloco.errors import ConfigError

LISTEN_KEY = "transport.grpc.status_listen"
"""The config key the listen address comes from, named in errors."""
_LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost")


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` for IPv6; an empty host means every interface)."""
    host, separator, port = listen.rpartition(":")
    if not separator or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{LISTEN_KEY} must be host:port, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def resolve_listen(host: str, port: int) -> tuple[socket.AddressFamily, str, bool]:
    """The address family and address to bind, and whether every address of `host` is
    loopback (a name resolving to several addresses counts as loopback only if all are)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ConfigError(f"{LISTEN_KEY} host {host!r} does not resolve: {error}") from None
    addresses = [str(info[4][0]) for info in found]
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    return found[0][0], addresses[0], loopback


def host_is_loopback(host_header: str) -> bool:
    """Whether an HTTP Host header names this machine's loopback (any port)."""
    host = urlsplit("//" + host_header).hostname or ""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BearerCheck:
    """Checks `Authorization: Bearer <token>` headers in constant time; counts refusals.
    With `token=None` every request is let through (a loopback bind)."""

    def __init__(self, token: str | None):
        self._token = None if token is None else token.encode()
        self._lock = threading.Lock()
        self.refused = 0

    def allows(self, header: str | None) -> bool:
        if self._token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        # compare_digest on bytes: its time does not depend on where the first difference is.
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)
        if not ok:
            with self._lock:
                self.refused += 1
        return ok
