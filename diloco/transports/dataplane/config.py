"""The data plane's section, `transport.grpc.dataplane`: whether payloads travel on it, where its
server listens, its limits and timeouts (grpc stays the control plane).

Standard library and `diloco.errors` only (config errors must answer without loading torch);
every message names the full yaml key.
"""

from __future__ import annotations

from dataclasses import dataclass

from diloco.errors import require

KEY = "transport.grpc.dataplane"


@dataclass(kw_only=True)
class DataPlaneConfig:
    enabled: bool = True
    """Payload bytes travel on the data plane: one TLS TCP stream per exchange, admitted by a
    ticket the coordinator issues on grpc, averaged chunk by chunk as they arrive. false: they
    travel on the grpc stream (slower; the coordinator also falls back to it for
    transport.aggregate median / trimmed_mean, transport.clip_norm and codecs of a plugin)."""
    listen: str = ""
    """host:port the coordinator's data-plane server binds; islands connect to the host of
    transport.grpc.address at the port the coordinator announces. Empty: the host of
    grpc.listen (or grpc.address), on a free port (open it in a firewall with a fixed port)."""
    max_connections: int = 128
    """Connections the data-plane server holds at once, all islands and unauthenticated peers
    together; one more is closed at accept and counted."""
    max_pending: int = 64
    """Connections still in their TLS handshake or hello (not yet holding a valid ticket); one
    more is closed at accept. With dataplane.hello_timeout_s it bounds what peers without a
    ticket can hold."""
    max_connections_per_island: int = 8
    """Exchanges one island may run at once (shards x fragments in flight); one more is
    refused after its hello, so one island cannot take the slots of the others."""
    hello_timeout_s: float = 10.0
    """Seconds a new connection has for its TLS handshake and hello."""
    inactivity_timeout_s: float = 60.0
    """Seconds any single read or write of an exchange may wait for progress (without TLS a
    read takes up to 4 MiB at once, so a stream that stops partway through one is noticed
    within twice this)."""
    chunk_bytes: int = 4 << 20
    """Target size of one chunk of each island's payload bytes that the coordinator decodes
    and accumulates at a time (rounded to whole codec blocks; at most as many elements, so its
    fp32 working chunks are at most 4x this); its memory is O(chunk_bytes x islands)."""
    socket_buffer_bytes: int = 0
    """SO_SNDBUF / SO_RCVBUF asked of the kernel for every data-plane socket (capped by
    net.core.wmem_max / rmem_max); 0 keeps the kernel's autotuning, which grows each buffer
    up to net.ipv4.tcp_rmem / tcp_wmem's maximum (a fixed size turns it off: 4 MiB took
    loopback answers from 0.054 s to 0.082 s for 2 x 100 MB, docs/results/streaming.md)."""
    ticket_ttl_s: float = 600.0
    """Seconds a ticket stays valid after the control plane issues it."""
    replay_cache_size: int = 1 << 16
    """Used ticket ids remembered until they expire; when full, new hellos are refused
    rather than forgetting an unexpired id (a replay must never pass)."""

    def __post_init__(self) -> None:
        if self.listen:
            host, _, port = self.listen.rpartition(":")
            require(bool(host) and port.isdigit(), f"{KEY}.listen", "host:port", self.listen)
        for name in ("max_connections", "max_pending", "max_connections_per_island"):
            value = getattr(self, name)
            require(value >= 1, f"{KEY}.{name}", ">= 1", value)
        require(
            self.max_pending <= self.max_connections,
            f"{KEY}.max_pending",
            f"<= max_connections ({self.max_connections})",
            self.max_pending,
        )
        for name in ("hello_timeout_s", "inactivity_timeout_s", "ticket_ttl_s"):
            value = getattr(self, name)
            require(value > 0, f"{KEY}.{name}", "> 0 seconds", value)
        require(self.chunk_bytes >= 4096, f"{KEY}.chunk_bytes", ">= 4096", self.chunk_bytes)
        require(
            self.socket_buffer_bytes >= 0,
            f"{KEY}.socket_buffer_bytes",
            ">= 0 (0: the kernel's autotuning)",
            self.socket_buffer_bytes,
        )
        require(
            self.replay_cache_size >= 1,
            f"{KEY}.replay_cache_size",
            ">= 1",
            self.replay_cache_size,
        )
