"""Building the grpc transport's pieces from a `TransportSetup`: an island's transport, and the
coordinator (hosted by an island with `transport.grpc.serve`, or standalone).

Either way the coordinator keeps the group's shared state in `<run.dir>/coordinator/`
(persisted after every round), so a restarted coordinator carries on where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from diloco.errors import ConfigError, read_text_file
from diloco.transports.base import TransportSetup
from diloco.transports.grpc.client import GrpcTransport
from diloco.transports.grpc.coordinator import Coordinator
from diloco.transports.grpc.lanes import session_file
from diloco.transports.grpc.rounds import RoundRules
from diloco.transports.grpc.security import read_token
from diloco.transports.grpc.service import CoordinatorServer
from diloco.transports.grpc.status_feed import attach_status, refused_calls

log = logging.getLogger(__name__)


def coordinator_dir(run_dir: Path) -> Path:
    return run_dir / "coordinator"


def round_rules(setup: TransportSetup) -> RoundRules:
    transport, grpc = setup.config, setup.config.grpc
    return RoundRules(
        run_id=transport.run_id,
        rounds=setup.rounds,
        islands=transport.islands,
        min_islands=transport.min_islands,
        aggregate=transport.aggregate.value,
        trim_fraction=transport.trim_fraction,
        clip_norm=transport.clip_norm,
        deadline_floor_s=grpc.deadline_floor_s,
        deadline_ceiling_s=grpc.deadline_ceiling_s,
        deadline_slack=grpc.deadline_slack,
    )


def pinned_fingerprint(setup: TransportSetup) -> dict[str, str]:
    """What the coordinator fixes before any island joins: the settings it knows from its own
    config, and the whole fingerprint when `transport.grpc.fingerprint_file` names one."""
    pinned = dict(setup.group_settings)
    path = setup.config.grpc.fingerprint_file
    if path:
        pinned.update(read_fingerprint_file(Path(path)))
    return pinned


def read_fingerprint_file(path: Path) -> dict[str, str]:
    key = "transport.grpc.fingerprint_file"
    text = read_text_file(key, path)
    try:
        loaded = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"{key}: {str(path)!r} is not a fingerprint file ({error})") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
    ):
        raise ConfigError(f"{key}: {str(path)!r} must map names to strings (fingerprint.json)")
    return loaded


def start_coordinator(setup: TransportSetup, token: str) -> CoordinatorServer:
    """Build the coordinator from the setup, restore its persisted state, start serving (and
    its status page with transport.grpc.status_listen, stopped with it)."""
    coordinator = Coordinator(
        round_rules(setup),
        setup.codec,
        setup.optimizer,
        pinned=pinned_fingerprint(setup),
        state_dir=coordinator_dir(setup.run_dir),
        offload_state=setup.offload_state,
    )
    server = CoordinatorServer(coordinator, setup.config.grpc, token)
    attach_status(server, setup, token, coordinator_dir(setup.run_dir))
    return server.start()


def build_grpc_transport(setup: TransportSetup) -> GrpcTransport:
    """The island's transport; with grpc.serve, the coordinator starts in this process (with
    its first lane: the island's other lanes get it in `setup.bootstrap`, and use it)."""
    settings = setup.config.grpc
    token = read_token(settings)
    hosted = start_coordinator(setup, token) if settings.serve and not setup.bootstrap else None
    rank = setup.ranks[0]
    transport = GrpcTransport(
        settings,
        run_id=setup.config.run_id,
        token=token,
        codec=setup.codec,
        numel=setup.numel,
        rank=rank,
        num_islands=setup.config.islands,
        session_file=session_file(setup.run_dir / f"island-{rank}", setup.lane),
        lane=setup.lane,
    )
    if hosted is not None:
        transport.visible_maddrs = (settings.address,)
        transport.on_close = lambda: linger_then_stop(hosted, settings.linger_s, but=rank)
    return transport


def linger_then_stop(server: CoordinatorServer, linger_s: float, but: int | None = None) -> None:
    """Stay until every island (but `but`, the host, whose other lanes leave after this) has
    left every lane (late ones still need the last mean) or `linger_s` passed, then stop;
    answers still streaming get `linger_s` more to finish."""
    deadline = time.monotonic() + linger_s
    while time.monotonic() < deadline and not (
        server.finished() and server.lanes.everyone_left(but)
    ):
        time.sleep(0.2)
    server.stop(grace_s=linger_s)


def summary(server: CoordinatorServer, islands: int) -> Mapping[str, object]:
    """The coordinator's own figures at the end of a run."""
    coordinator = server.coordinator
    stats = coordinator.stats
    return {
        "role": "coordinator",
        "rounds": coordinator.round,
        "islands": islands,
        "participants_per_round": stats.participants,
        "late_payloads": stats.late_payloads,
        "refused_payloads": stats.refused_payloads,
        "dropped_payloads": stats.dropped_payloads,
        "refused_calls": refused_calls(server),
        "cancelled_streams": server.service.watchdog.cancelled,
        "adopted": stats.adopted,
        "params_sha256": coordinator.state_sha256(),
        "shared_parameters": coordinator.numel,
        **({"lanes": lanes} if (lanes := server.lanes.summary()) else {}),
    }
