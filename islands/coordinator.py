"""The grpc coordinator, hosted by an island (`transport.grpc.serve`) or standalone
(`transport.grpc.role: coordinator`, started with the same `diloco-island` command).

Either way it keeps the group's shared state in `<run.dir>/coordinator/` (persisted after
every round), so a restarted coordinator carries on where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from diloco.codecs import Codec, build_codec
from diloco.config import IslandConfig, to_container
from diloco.config.schema import GrpcRole, TransportKind
from diloco.transports.grpc import (
    CoordinatorServer,
    GrpcTransport,
    RoundBook,
    RoundRules,
    read_token,
)

log = logging.getLogger(__name__)


def is_standalone_coordinator(config: IslandConfig) -> bool:
    return (
        config.transport.kind is TransportKind.grpc
        and config.transport.grpc.role is GrpcRole.coordinator
    )


def coordinator_dir(config: IslandConfig) -> Path:
    return Path(config.run.dir) / "coordinator"


def start_coordinator(config: IslandConfig, token: str) -> CoordinatorServer:
    """Build the coordinator from the config, restore its persisted state, start serving."""
    # Imported here: islands.island imports this module for the island side.
    from islands.island import group_settings

    transport, outer = config.transport, config.outer
    rules = RoundRules(
        run_id=transport.run_id,
        rounds=outer.rounds,
        islands=transport.islands,
        min_islands=transport.min_islands,
        lr=outer.lr,
        momentum=outer.momentum,
        nesterov=outer.nesterov,
        aggregate=transport.aggregate.value,
        trim_fraction=transport.trim_fraction,
        clip_norm=transport.clip_norm,
        deadline_floor_s=transport.grpc.deadline_floor_s,
        deadline_ceiling_s=transport.grpc.deadline_ceiling_s,
        deadline_slack=transport.grpc.deadline_slack,
    )
    book = RoundBook(rules, _codec(config), group_settings(config), coordinator_dir(config))
    return CoordinatorServer(book, transport.grpc, token).start()


def grpc_island_transport(
    config: IslandConfig, codec: Codec, numel: int, rank: int
) -> GrpcTransport:
    """The island's transport; with grpc.serve, the coordinator starts in this process."""
    settings = config.transport.grpc
    token = read_token(settings)
    hosted = start_coordinator(config, token) if settings.serve else None
    transport = GrpcTransport(
        settings,
        run_id=config.transport.run_id,
        token=token,
        codec=codec,
        numel=numel,
        rank=rank,
        num_islands=config.transport.islands,
    )
    if hosted is not None:
        transport.on_close = lambda: _linger_then_stop(hosted, settings.linger_s)
    return transport


def run_coordinator(config: IslandConfig) -> dict[str, Any]:
    """Serve until the last round has closed and the islands have left (or linger_s passed).

    Returns the summary, also written to <run.dir>/coordinator/summary.json.
    """
    server = start_coordinator(config, read_token(config.transport.grpc))
    address = config.transport.grpc.listen or config.transport.grpc.address
    print(
        f"diloco coordinator for run {config.transport.run_id!r} on {address} "
        f"({config.transport.islands} islands, {config.outer.rounds} rounds)",
        flush=True,
    )
    try:
        while not server.book.finished():
            time.sleep(0.5)
        _linger_then_stop(server, config.transport.grpc.linger_s)
    except BaseException:
        server.stop()
        raise
    return _write_summary(config, server)


def _linger_then_stop(server: CoordinatorServer, linger_s: float) -> None:
    """Stay until every island has left (late ones still need the last mean) or `linger_s`
    passed, then stop; answers still streaming get `linger_s` more to finish."""
    book = server.book
    deadline = time.monotonic() + linger_s
    while time.monotonic() < deadline and not (book.finished() and book.everyone_left()):
        time.sleep(0.2)
    server.stop(grace_s=linger_s)


def _write_summary(config: IslandConfig, server: CoordinatorServer) -> dict[str, Any]:
    book = server.book
    stats = book.stats
    summary = {
        "role": "coordinator",
        "rounds": book.round,
        "islands": config.transport.islands,
        "participants_per_round": stats.participants,
        "late_payloads": stats.late_payloads,
        "refused_payloads": stats.refused_payloads,
        "refused_calls": server.refused_calls,
        "adopted": stats.adopted,
        "params_sha256": book.state_sha256(),
        "shared_parameters": book.numel,
        "config": to_container(config),
    }
    out = coordinator_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / "summary.json.tmp"
    temporary.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(temporary, out / "summary.json")
    return summary


def _codec(config: IslandConfig) -> Codec:
    return build_codec(
        config.outer.codec.value,
        block_size=config.outer.block_size,
        topk_fraction=config.outer.topk_fraction,
    )
