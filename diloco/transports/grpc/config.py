"""The `transport.grpc` section: where the coordinator is, its security, its round deadlines."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from diloco.errors import ConfigError, require
from diloco.transports.dataplane.config import DataPlaneConfig


class GrpcRole(enum.Enum):
    island = "island"
    coordinator = "coordinator"


@dataclass(kw_only=True)
class GrpcTransportConfig:
    address: str = "127.0.0.1:50051"
    """host:port of the coordinator: where islands connect and, unless grpc.listen is set,
    where the coordinator listens."""
    listen: str = ""
    """host:port the coordinator binds (e.g. 0.0.0.0:50051 behind a public name); empty:
    grpc.address."""
    role: GrpcRole = GrpcRole.island
    """island (train; with grpc.serve also host the coordinator) or coordinator (only average:
    a standalone coordinator started with the same command and config)."""
    serve: bool = False
    """This island also hosts the coordinator, in the same process."""
    token_env: str = "DILOCO_TOKEN"
    """Environment variable holding the run token every call must carry (never logged)."""
    token_file: str = ""
    """File holding the run token; read instead of grpc.token_env when set."""
    tls_cert: str = ""
    """PEM certificate: the coordinator serves with it; with grpc.mutual_tls islands present
    it too (a self-signed pair shared by a run's sites: docs/transports.md)."""
    tls_key: str = ""
    """PEM private key of grpc.tls_cert."""
    tls_ca: str = ""
    """PEM certificate(s) islands trust for the coordinator, and the coordinator trusts for
    islands under mutual TLS; empty: grpc.tls_cert itself (a self-signed pair)."""
    mutual_tls: bool = False
    """The coordinator also requires islands to present a certificate signed by grpc.tls_ca."""
    insecure: bool = False
    """Allow plaintext (no TLS) on the wire, for loopback experiments only; the run token is
    still required."""
    deadline_floor_s: float = 30.0
    """A round waits at least this long after its first payload for the other islands."""
    deadline_ceiling_s: float = 600.0
    """A round waits at most this long after its first payload (once transport.min_islands
    have reported)."""
    deadline_slack: float = 2.0
    """The deadline is this many times the latest arrival seen in recent rounds (measured from
    each round's first payload), kept within the floor and the ceiling."""
    stream_idle_s: float = 60.0
    """A payload or state stream that moves no bytes for this long is cut, and so is one that
    moves less than 1 MB/s on average after its first stream_idle_s or sends no header within
    min(10 s, stream_idle_s) (the coordinator frees what it held; an island retries)."""
    fingerprint_file: str = ""
    """Coordinator: a fingerprint.json written by an island of this run (run.dir/island-<rank>/
    fingerprint.json): the group's model and settings are then fixed by this file instead of
    by the first island that joins."""
    retry_s: float = 300.0
    """How long an island retries an unreachable coordinator (bounded exponential backoff)
    before it fails."""
    linger_s: float = 60.0
    """After the last round the coordinator waits up to this long for every island to leave
    (late ones still need the last mean), and as long again for answers still streaming."""
    dataplane: DataPlaneConfig = field(default_factory=DataPlaneConfig)
    """Where payload bytes travel: the data plane (one TLS stream per exchange, the same
    certificates and token) or, with dataplane.enabled=false, the grpc stream."""
    max_lanes: int = 16
    """Lanes (independent exchange groups: one per Streaming DiLoCo fragment of outer.fragments,
    per rank of multi-rank islands, or per both) the coordinator hosts besides its main one; a
    Join that would open one more is refused. At least outer.fragments x ranks per island."""
    status_listen: str = ""
    """host:port of the coordinator's read-only status page (GET / and /status.json); port 0:
    a free one, written to run.dir/coordinator/status-address; empty: no page. A loopback
    address (127.0.0.1:8080) is open to this machine's users; any other needs the run token in
    an `Authorization: Bearer` header (docs/transports.md, "Status page")."""

    def __post_init__(self) -> None:
        for key, value in (
            ("address", self.address),
            ("listen", self.listen or "h:1"),
            ("status_listen", self.status_listen or "h:1"),
        ):
            host, _, port = value.rpartition(":")
            require(bool(host) and port.isdigit(), f"transport.grpc.{key}", "host:port", value)
        require(
            self.deadline_floor_s > 0,
            "transport.grpc.deadline_floor_s",
            "> 0",
            self.deadline_floor_s,
        )
        require(
            self.deadline_ceiling_s >= self.deadline_floor_s,
            "transport.grpc.deadline_ceiling_s",
            f">= deadline_floor_s ({self.deadline_floor_s})",
            self.deadline_ceiling_s,
        )
        require(
            self.deadline_slack >= 1, "transport.grpc.deadline_slack", ">= 1", self.deadline_slack
        )
        require(self.retry_s > 0, "transport.grpc.retry_s", "> 0", self.retry_s)
        require(self.stream_idle_s > 0, "transport.grpc.stream_idle_s", "> 0", self.stream_idle_s)
        require(self.linger_s >= 0, "transport.grpc.linger_s", ">= 0", self.linger_s)
        require(self.max_lanes >= 0, "transport.grpc.max_lanes", ">= 0", self.max_lanes)
        require(
            bool(self.tls_cert) == bool(self.tls_key),
            "transport.grpc.tls_key",
            "set together with tls_cert",
            self.tls_key,
        )
        if self.mutual_tls and not self.tls_cert:
            raise ConfigError("transport.grpc.mutual_tls needs transport.grpc.tls_cert/tls_key")
