"""The `transport.hivemind` section: how an island finds its peers and how long it waits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from diloco.errors import require

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(kw_only=True)
class HivemindTransportConfig:
    initial_peers: list[str] = field(default_factory=list)
    """Multiaddrs of islands already running (/ip4/HOST/tcp/PORT/p2p/PEER_ID); empty (and no
    hivemind.initial_peers_file): this island starts the group and prints its address."""
    initial_peers_file: str = ""
    """File of multiaddrs, one a line, added to hivemind.initial_peers (e.g. another island's
    hivemind.address_file); waited for up to hivemind.averaging_timeout_s."""
    address_file: str = ""
    """This island writes the multiaddrs others can join it at here once it listens."""
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    """Multiaddrs this island listens on (tcp/0: a free port)."""
    announce_maddrs: list[str] = field(default_factory=list)
    """Multiaddrs announced to peers instead of the listening ones (a public address behind
    NAT or port forwarding)."""
    use_relay: bool = True
    """Reach peers behind NAT, and be reached, through libp2p circuit relays."""
    use_auto_relay: bool = False
    """Behind NAT: find relays among the peers and announce addresses through them."""
    client_mode: bool = False
    """This island accepts no incoming connections: it averages through the others but reduces
    no span of the vector and serves no state."""
    identity_path: str = ""
    """Private key of this island's peer id, created on first use (one per island: never share
    or commit it); empty: <run.dir>/island-<rank>/hivemind.key."""
    matchmaking_s: float = 15.0
    """How long a round's group waits for islands that have not arrived (hivemind's
    min_matchmaking_time); an island later than that catches up from the others."""
    request_timeout_s: float = 3.0
    """Timeout of one matchmaking request to a peer (below hivemind.matchmaking_s)."""
    next_chunk_timeout_s: float = 30.0
    """A peer silent this long in the middle of an all-reduce is dropped; the others average
    again without it."""
    averaging_timeout_s: float = 600.0
    """A round's average (matchmaking, all-reduce and its retries) fails after this long."""
    state_timeout_s: float = 60.0
    """Downloading the group's shared state from a peer gives up after this long without data
    (then the next peer is tried)."""
    token_env: str = ""
    """Environment variable holding the run token (at least 16 characters; e.g. DILOCO_TOKEN):
    islands prove they hold it before they are grouped, and never average with, serve their
    state to, or take a state from a peer that does not. Empty (and no hivemind.token_file): no
    run authentication, any peer that knows the run id and an island's address can average."""
    token_file: str = ""
    """File holding the run token; read instead of hivemind.token_env when set."""

    def __post_init__(self) -> None:
        for key in ("matchmaking_s", "next_chunk_timeout_s", "averaging_timeout_s"):
            require(getattr(self, key) > 0, f"transport.hivemind.{key}", "> 0", getattr(self, key))
        require(
            self.state_timeout_s > 0,
            "transport.hivemind.state_timeout_s",
            "> 0",
            self.state_timeout_s,
        )
        require(
            0 < self.request_timeout_s < self.matchmaking_s,
            "transport.hivemind.request_timeout_s",
            f"in (0, matchmaking_s={self.matchmaking_s})",
            self.request_timeout_s,
        )
        require(
            not self.token_env or _ENV_NAME.fullmatch(self.token_env) is not None,
            "transport.hivemind.token_env",
            "an environment variable name such as DILOCO_TOKEN (or empty: no run token)",
            self.token_env,
        )
        for key in ("initial_peers", "host_maddrs", "announce_maddrs"):
            for maddr in getattr(self, key):
                require(
                    str(maddr).startswith("/"),
                    f"transport.hivemind.{key}",
                    "multiaddrs such as /ip4/127.0.0.1/tcp/31337",
                    maddr,
                )
