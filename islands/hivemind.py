"""The island's hivemind transport, built from the config; says where others can join it."""

from __future__ import annotations

import os
from pathlib import Path

from diloco.codecs import Codec
from diloco.config import IslandConfig
from diloco.errors import ConfigError


def hivemind_island_transport(config: IslandConfig, codec: Codec, numel: int, rank: int):  # type: ignore[no-untyped-def]
    """Start this island's DHT node; print the multiaddrs other islands can join it at."""
    try:
        from diloco.transports.hivemind import HivemindGroup, HivemindTransport
    except ImportError as error:
        raise ConfigError(
            f"transport.kind hivemind needs the hivemind package ({error.name} is missing): "
            'pip install -e ".[hivemind]"'
        ) from None
    transport_config, outer = config.transport, config.outer
    settings = transport_config.hivemind
    identity = settings.identity_path or str(
        Path(config.run.dir) / f"island-{rank}" / "hivemind.key"
    )
    Path(identity).parent.mkdir(parents=True, exist_ok=True)
    group = HivemindGroup(
        run_id=transport_config.run_id,
        num_islands=transport_config.islands,
        min_islands=transport_config.min_islands,
        lr=outer.lr,
        momentum=outer.momentum,
        nesterov=outer.nesterov,
    )
    transport = HivemindTransport(
        settings,
        group,
        codec,
        numel=numel,
        rank=rank,
        identity_path=identity,
        block_size=int(getattr(codec, "block_size", 1)),
    )
    maddrs = transport.visible_maddrs
    if settings.address_file:
        temporary = f"{settings.address_file}.tmp"
        Path(temporary).write_text("".join(f"{maddr}\n" for maddr in maddrs))
        os.replace(temporary, settings.address_file)
    peers = ",".join(maddrs)
    print(
        f"hivemind: island {rank} of run {transport_config.run_id!r} listens at {peers}; "
        f"other islands join with transport.hivemind.initial_peers=[{peers}]",
        flush=True,
    )
    return transport
