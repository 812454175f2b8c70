"""Building an island's hivemind transport from a `TransportSetup`, and saying where others can
join it (its multiaddrs, also written to `transport.hivemind.address_file` when set)."""

from __future__ import annotations

from pathlib import Path

from diloco.checkpoint.atomic import write_atomic
from diloco.transports.base import TransportSetup
from diloco.transports.hivemind.transport import HivemindGroup, HivemindTransport


def build_hivemind_transport(setup: TransportSetup) -> HivemindTransport:
    """Start this island's DHT node; announce the multiaddrs other islands can join it at."""
    config, rank = setup.config, setup.ranks[0]
    settings = config.hivemind
    identity = settings.identity_path or str(setup.run_dir / f"island-{rank}" / "hivemind.key")
    Path(identity).parent.mkdir(parents=True, exist_ok=True)
    group = HivemindGroup(
        run_id=config.run_id,
        num_islands=config.islands,
        optimizer=setup.optimizer,
        min_islands=config.min_islands,
    )
    transport = HivemindTransport(
        settings,
        group,
        setup.codec,
        numel=setup.numel,
        rank=rank,
        identity_path=identity,
        block_size=int(getattr(setup.codec, "block_size", 1)),
    )
    maddrs = transport.visible_maddrs
    if settings.address_file:
        write_atomic(settings.address_file, "".join(f"{maddr}\n" for maddr in maddrs))
    peers = ",".join(maddrs)
    setup.announce(
        f"hivemind: island {rank} of run {config.run_id!r} listens at {peers}; "
        f"other islands join with transport.hivemind.initial_peers=[{peers}]"
    )
    return transport
