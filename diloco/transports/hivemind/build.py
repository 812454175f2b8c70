"""Building an island's hivemind transport from a `TransportSetup`, and saying where others can
join it (its multiaddrs, also written to `transport.hivemind.address_file` when set)."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from diloco.checkpoint.atomic import write_atomic
from diloco.errors import make_directory
from diloco.transports.base import TransportSetup
from diloco.transports.hivemind.auth import read_run_token
from diloco.transports.hivemind.transport import HivemindGroup, HivemindTransport

log = logging.getLogger(__name__)

_ANY_PORT = re.compile(r"/tcp/\d+")


def is_lead_lane(lane: str) -> bool:
    """The island's first lane ("", fragment-0, shard-0, fragment-0.shard-0): the one that
    listens where the config says and that other islands are told to join."""
    return all(int(index) == 0 for index in re.findall(r"\d+", lane))


def build_hivemind_transport(setup: TransportSetup) -> HivemindTransport:
    """Start this island's DHT node; announce the multiaddrs other islands can join it at.

    Raises:
        ConfigError: transport.hivemind.token_env / token_file is set but holds no valid token.
    """
    config, rank = setup.config, setup.ranks[0]
    settings = config.hivemind
    lead = is_lead_lane(setup.lane)  # the lane other islands are told to join
    if setup.bootstrap:  # another lane of this island: meet the DHT through the first lane
        peers = [*settings.initial_peers, *setup.bootstrap]
        settings = dataclasses.replace(settings, initial_peers=peers)
    if not lead:  # the lead lane holds the configured ports; the others take free ones
        settings = dataclasses.replace(
            settings,
            host_maddrs=[_ANY_PORT.sub("/tcp/0", maddr) for maddr in settings.host_maddrs],
            announce_maddrs=[],
        )
    token = read_run_token(settings)
    if token is None:
        log.info(
            "hivemind: no run token (transport.hivemind.token_env / token_file): any peer that "
            "knows run %r and an island's address can average with this island",
            config.run_id,
        )
    identity = settings.identity_path or str(setup.run_dir / f"island-{rank}" / "hivemind.key")
    if not lead:  # a node of its own per lane: its own peer id
        identity = f"{identity}.{setup.lane}"
    make_directory("transport.hivemind.identity_path", Path(identity).parent)
    group = HivemindGroup(
        run_id=config.run_id,
        num_islands=config.islands,
        optimizer=setup.optimizer,
        min_islands=config.min_islands,
        token=token,
    )
    transport = HivemindTransport(
        settings,
        group,
        setup.codec,
        numel=setup.numel,
        rank=rank,
        identity_path=identity,
        block_size=int(getattr(setup.codec, "block_size", 1)),
        lane=setup.lane,
    )
    if not lead:
        return transport
    maddrs = transport.visible_maddrs
    if settings.address_file:
        write_atomic(settings.address_file, "".join(f"{maddr}\n" for maddr in maddrs))
    listening = ",".join(maddrs)
    setup.announce(
        f"hivemind: island {rank} of run {config.run_id!r} listens at {listening}; "
        f"other islands join with transport.hivemind.initial_peers=[{listening}]"
    )
    return transport
