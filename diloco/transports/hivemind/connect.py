"""How an island starts its DHT node and finds the islands already running.

The node runs in hivemind's DHT process with its libp2p daemon (p2pd), both keeping their
unix sockets in the island's socket directory (sockets.py). Islands may start in any order:
the first writes its multiaddrs to `hivemind.address_file`, which the others read as
`hivemind.initial_peers_file`, waiting for it to appear.

hivemind DHT: https://github.com/learning-at-home/hivemind (dht/dht.py, 1.1.12).
"""

from __future__ import annotations

import re
import time

from diloco.errors import ConfigError
from diloco.transports.hivemind.averager import IslandDHT
from diloco.transports.hivemind.config import HivemindTransportConfig


def start_dht(
    settings: HivemindTransportConfig, identity_path: str, socket_prefix: str
) -> IslandDHT:
    """This island's DHT node, started and connected to the configured initial peers."""
    peers = list(settings.initial_peers) + read_peers(
        settings.initial_peers_file, settings.averaging_timeout_s
    )
    try:
        return IslandDHT(
            initial_peers=peers,
            start=True,
            host_maddrs=list(settings.host_maddrs),
            announce_maddrs=list(settings.announce_maddrs) or None,
            identity_path=identity_path,
            use_relay=settings.use_relay,
            use_auto_relay=settings.use_auto_relay,
            client_mode=settings.client_mode,
            socket_prefix=socket_prefix,
        )
    except Exception as error:  # p2pd's P2PDaemonError, raised through the DHT's process
        said = daemon_error_said(settings, peers, identity_path, str(error))
        if said is None:
            raise
        raise said from None


def daemon_error_said(
    settings: HivemindTransportConfig, peers: list[str], identity_path: str, message: str
) -> Exception | None:
    """p2pd's failure to start, with the key it comes from (None: not one we know): an address
    it cannot listen on (host_maddrs), a multiaddr it cannot parse (the list holding it), an
    identity file that is not a libp2p key (identity_path)."""
    listening = re.search(r"failed to listen on any addresses: \[?(.*?)\]?$", message)
    if listening:
        key = "transport.hivemind.host_maddrs"
        return OSError(f"{key} {list(settings.host_maddrs)}: {listening.group(1)}")
    unparsed = re.search(r'failed to parse multiaddr "([^"]*)"(?::\s*(.*))?', message)
    if unparsed:
        address, why = unparsed.group(1), unparsed.group(2) or "not a multiaddr"
        lists = {
            "transport.hivemind.initial_peers": peers,
            "transport.hivemind.host_maddrs": list(settings.host_maddrs),
            "transport.hivemind.announce_maddrs": list(settings.announce_maddrs),
        }
        key = next((k for k, given in lists.items() if address in given), "a hivemind multiaddr")
        return ConfigError(f"{key}: {address!r} does not parse ({why})")
    if "proto:" in message:  # the identity file's protobuf
        return ConfigError(
            f"transport.hivemind.identity_path: {identity_path!r} is not a libp2p identity key "
            "(remove it and a new one is written)"
        )
    return None


def read_peers(path: str, wait_s: float) -> list[str]:
    """The multiaddrs in `path`, waiting up to `wait_s` for it to appear (islands may start in
    any order: the first writes its hivemind.address_file)."""
    if not path:
        return []
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as file:
                peers = [line.strip() for line in file if line.strip()]
            if peers:
                return peers
        except FileNotFoundError:
            pass
        except OSError as error:
            raise ValueError(
                f"transport.hivemind.initial_peers_file {path!r} cannot be read: {error.strerror}"
            ) from None
        if time.monotonic() > deadline:
            raise ValueError(
                f"transport.hivemind.initial_peers_file {path!r} holds no multiaddr after "
                f"{wait_s:.0f} s: start the first island with hivemind.address_file={path}"
            )
        time.sleep(0.1)
