"""Every address a process listens on: a second coordinator on the same address, a port
already taken, a host that is not this machine's. Each is one error naming the key, and no
second server ever shares an address (grpc's default SO_REUSEPORT let it)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from diloco.codecs import build_codec
from diloco.errors import ConfigError, listen_error
from diloco.outer.optimizers import SgdOuter
from diloco.status.server import StatusServer
from diloco.transports.dataplane.config import DataPlaneConfig
from diloco.transports.grpc import Coordinator, CoordinatorServer, RoundRules
from diloco.transports.grpc.config import GrpcTransportConfig

TOKEN = "listen-token-0123456789"


def _coordinator(tmp_path: Path, **settings: object) -> CoordinatorServer:
    rules = RoundRules(run_id="run", rounds=2, islands=2, min_islands=2)
    coordinator = Coordinator(
        rules,
        build_codec("none"),
        SgdOuter(lr=0.7, momentum=0.9, nesterov=True),
        pinned={},
        state_dir=tmp_path / "c",
    )
    config = GrpcTransportConfig(insecure=True, **settings)  # type: ignore[arg-type]
    return CoordinatorServer(coordinator, config, TOKEN)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.timeout(60)
def test_a_second_coordinator_on_the_same_address_is_refused(tmp_path: Path) -> None:
    first = _coordinator(tmp_path / "1", address="127.0.0.1:0").start()
    try:
        address = f"127.0.0.1:{first.port}"
        with pytest.raises(
            OSError,
            match=rf"^transport\.grpc\.address: the coordinator cannot listen on {address} ",
        ):
            _coordinator(tmp_path / "2", address=address)
    finally:
        first.stop(0)


@pytest.mark.timeout(60)
def test_a_taken_data_plane_port_names_its_key(tmp_path: Path, taken_port: int) -> None:
    dataplane = DataPlaneConfig(listen=f"127.0.0.1:{taken_port}")
    with pytest.raises(
        OSError, match=rf"^transport\.grpc\.dataplane\.listen: 127\.0\.0\.1:{taken_port} is in use"
    ):
        _coordinator(tmp_path, address="127.0.0.1:0", dataplane=dataplane)


@pytest.mark.timeout(60)
def test_a_host_that_is_not_this_machines_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^transport\.grpc\.listen: '192\.0\.2\.1:7000' is not"):
        _coordinator(tmp_path, address="127.0.0.1:0", listen="192.0.2.1:7000")


@pytest.mark.timeout(60)
def test_a_taken_status_port_names_its_key(taken_port: int) -> None:
    server = StatusServer(f"127.0.0.1:{taken_port}", lambda: pytest.fail("never requested"))
    with pytest.raises(OSError, match=r"^transport\.grpc\.status_listen: 127\.0\.0\.1:\d+ is in"):
        server.start()


@pytest.mark.parametrize(
    ("error", "kind", "words"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), ConfigError, "resolve"),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign"), ConfigError, "not an address of this"),
        (OSError(errno.EADDRINUSE, "Address already in use"), OSError, "is in use"),
        (OSError(errno.EACCES, "Permission denied"), OSError, "permission denied"),
        (OSError(errno.ENOBUFS, "No buffer space"), OSError, "cannot listen on h:1: No buffer"),
    ],
)
def test_each_bind_failure_is_said_with_its_key(
    error: OSError, kind: type[Exception], words: str
) -> None:
    said = listen_error("some.listen", "h:1", error)
    assert type(said) is kind and str(said).startswith("some.listen: ") and words in str(said)


@pytest.mark.timeout(60)
def test_a_taken_torch_rendezvous_port_names_init_method(taken_port: int) -> None:
    from diloco.transports.torch_distributed import TorchDistributedTransport

    init_method = f"tcp://127.0.0.1:{taken_port}"
    with pytest.raises(
        OSError, match=rf"^transport\.torch\.init_method {init_method}: .*EADDRINUSE"
    ):
        TorchDistributedTransport(
            build_codec("none"), 10, rank=0, num_islands=2, init_method=init_method, timeout_s=5
        )


@pytest.mark.timeout(60)
def test_a_taken_hivemind_port_names_host_maddrs(tmp_path: Path, taken_port: int) -> None:
    pytest.importorskip("hivemind")
    from diloco.transports.hivemind import HivemindTransportConfig
    from diloco.transports.hivemind.connect import start_dht

    settings = HivemindTransportConfig(host_maddrs=[f"/ip4/127.0.0.1/tcp/{taken_port}"])
    with pytest.raises(
        OSError, match=r"^transport\.hivemind\.host_maddrs .*address already in use"
    ):
        start_dht(settings, str(tmp_path / "peer.key"), f"/unix{tmp_path}/hivemind-")


@pytest.mark.parametrize(
    ("message", "kind", "said"),
    [
        (
            "Daemon failed to start: 2026/12/02 failed to listen on any addresses: "
            "[listen tcp4 127.0.0.1:5: bind: address already in use]",
            OSError,
            "transport.hivemind.host_maddrs ['/ip4/127.0.0.1/tcp/5']: listen tcp4 127.0.0.1:5",
        ),
        (
            'Daemon failed to start: failed to parse multiaddr "/ip4/1.2.3.4/tcp/1/p2p/Qm": '
            'invalid value "Qm" for protocol p2p',
            ConfigError,
            "transport.hivemind.initial_peers: '/ip4/1.2.3.4/tcp/1/p2p/Qm' does not parse "
            '(invalid value "Qm" for protocol p2p)',
        ),
        (
            "Daemon failed to start: proto: cannot parse invalid wire-format data",
            ConfigError,
            "transport.hivemind.identity_path: '/run/peer.key' is not a libp2p identity key",
        ),
    ],
)
def test_each_hivemind_daemon_failure_is_said_with_its_key(
    message: str, kind: type[Exception], said: str
) -> None:
    pytest.importorskip("hivemind")
    from diloco.transports.hivemind import HivemindTransportConfig
    from diloco.transports.hivemind.connect import daemon_error_said

    settings = HivemindTransportConfig(host_maddrs=["/ip4/127.0.0.1/tcp/5"])
    error = daemon_error_said(settings, ["/ip4/1.2.3.4/tcp/1/p2p/Qm"], "/run/peer.key", message)
    assert type(error) is kind and str(error).startswith(said), error
    assert daemon_error_said(settings, [], "/run/peer.key", "something else") is None
