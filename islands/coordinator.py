"""The standalone grpc coordinator: `transport.grpc.role: coordinator`, started with the same
`diloco-island` command and config as the islands.

It keeps the group's shared state in `<run.dir>/coordinator/` (persisted after every round), so
a restarted coordinator carries on where it stopped, and writes its summary there at the end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from diloco.checkpoint.atomic import write_atomic
from diloco.codecs.registry import build_codec
from diloco.config import IslandConfig, to_container
from diloco.errors import make_directory
from diloco.metrics.jsonl import to_strict_json
from diloco.os_memory import return_freed_buffers_to_the_os
from diloco.outer.config import build_outer_optimizer
from diloco.transports.base import TransportSetup
from diloco.transports.config import TransportKind
from diloco.transports.grpc.config import GrpcRole
from diloco.transports.grpc.hosting import (
    coordinator_dir,
    linger_then_stop,
    start_coordinator,
    summary,
)
from diloco.transports.grpc.security import read_token
from islands.fingerprint import group_settings

log = logging.getLogger(__name__)


def is_standalone_coordinator(config: IslandConfig) -> bool:
    return (
        config.transport.kind is TransportKind.grpc
        and config.transport.grpc.role is GrpcRole.coordinator
    )


def run_coordinator(config: IslandConfig) -> dict[str, Any]:
    """Serve until the last round has closed and the islands have left (or linger_s passed).

    Returns the summary, also written to <run.dir>/coordinator/summary.json.
    """
    return_freed_buffers_to_the_os()  # a long-running server: see os_memory.py
    make_directory("run.dir", config.run.dir)
    outer = config.outer
    setup = TransportSetup(
        config=config.transport,
        codec=build_codec(
            outer.codec.value, block_size=outer.block_size, topk_fraction=outer.topk_fraction
        ),
        numel=0,  # the coordinator learns it from the islands' fingerprint
        ranks=[],
        rounds=outer.rounds,
        optimizer=build_outer_optimizer(outer),
        group_settings=group_settings(config),
        run_dir=Path(config.run.dir),
        device=torch.device("cpu"),
        offload_state=outer.offload_state,
        announce=lambda message: print(f"diloco coordinator: {message}", flush=True),
    )
    server = start_coordinator(setup, read_token(config.transport.grpc))
    address = config.transport.grpc.listen or config.transport.grpc.address
    print(
        f"diloco coordinator for run {config.transport.run_id!r} on {address} "
        f"({config.transport.islands} islands, {config.outer.rounds} rounds)",
        flush=True,
    )
    try:
        while not server.finished():  # every lane that holds a state
            time.sleep(0.5)
        linger_then_stop(server, config.transport.grpc.linger_s)
    except BaseException:
        server.stop()
        raise
    result = {**summary(server, config.transport.islands), "config": to_container(config)}
    write_atomic(
        coordinator_dir(Path(config.run.dir)) / "summary.json",
        to_strict_json(result, indent=2) + "\n",
    )
    return result
