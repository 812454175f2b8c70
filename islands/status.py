"""`diloco-island status --config island.yaml`: how the run is doing, as a terminal table.

Where it looks depends on transport.kind: local and torch runs are read from run.dir's
metrics files (`diloco.status.run_dir`); grpc asks the coordinator, hivemind reads the DHT
records the islands publish, both through fetchers the composition root passes in. Once such a
run is over nothing answers any more: then, if run.dir on this disk holds the run finished
(every island that wrote metrics wrote its summary.json), the table comes from there. The
answer is an exit code and a text: 0 and the table when the run is reachable, 1 and one line
saying why when it is not (the CLI prints that line after `diloco-island: `).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from diloco.status import (
    RunDescription,
    RunUnreachable,
    StatusSnapshot,
    StatusUnavailable,
    format_status,
    snapshot_from_run_dir,
)
from diloco.status.snapshot import Scalar

if TYPE_CHECKING:
    from diloco.config import IslandConfig

logger = logging.getLogger(__name__)

Fetcher = Callable[["IslandConfig"], StatusSnapshot]
"""Reads a remote run's snapshot; raises StatusUnavailable (or OSError, TimeoutError) with a
one-line reason when it cannot (unreachable, wrong token)."""


def run_status(
    config: IslandConfig,
    *,
    fetch_coordinator: Fetcher | None,
    fetch_hivemind: Fetcher | None,
    as_json: bool = False,
) -> tuple[int, str]:
    """The `status` command's answer: (0, the table) or (1, one line saying why not).

    Args:
        config: the island's config (any island of the run, or the coordinator's).
        fetch_coordinator: reads the grpc coordinator's snapshot (a `Status` call with the
            run token); None where this build cannot.
        fetch_hivemind: reads the snapshot from the DHT records; None where it cannot.
        as_json: answer the snapshot's JSON instead of the table (for scripts).
    """
    kind = config.transport.kind.value
    try:
        if kind in ("local", "torch"):
            snapshot = snapshot_from_run_dir(Path(config.run.dir), describe_run(config))
        else:
            fetcher = fetch_coordinator if kind == "grpc" else fetch_hivemind
            if fetcher is None:
                return 1, f"status: reading a {kind} run is not available in this build"
            snapshot = _fetch_or_finished(fetcher, config)
    except StatusUnavailable as error:
        return 1, f"status: {_one_line(str(error))}"
    except (OSError, TimeoutError) as error:
        # An unreachable coordinator or peer, a refused connection, an unreadable file.
        reason = _one_line(str(error)) or type(error).__name__
        return 1, f"status: {kind} run {config.transport.run_id!r} unreachable: {reason}"
    return 0, snapshot.to_json() if as_json else format_status(snapshot)


def _fetch_or_finished(fetcher: Fetcher, config: IslandConfig) -> StatusSnapshot:
    """The live run's snapshot; when nothing answers, the finished run's from run.dir."""
    try:
        return fetcher(config)
    except (RunUnreachable, OSError, TimeoutError):
        try:
            finished = snapshot_from_run_dir(Path(config.run.dir), describe_run(config))
        except StatusUnavailable:
            finished = None
        if finished is None or not finished.finished:
            raise
        logger.info("status: nothing answers; the run finished, read from %s", config.run.dir)
        return finished


def describe_run(config: IslandConfig) -> RunDescription:
    return RunDescription(
        run_id=config.transport.run_id,
        transport=config.transport.kind.value,
        num_islands=config.transport.islands,
        outer_settings=outer_settings(config),
    )


def outer_settings(config: IslandConfig) -> dict[str, Scalar]:
    """The settings the status shows, flat: what every island of the run shares."""
    outer, transport = config.outer, config.transport
    settings: dict[str, Scalar] = {
        "outer.rounds": outer.rounds,
        "outer.inner_steps": outer.inner_steps,
        "outer.optimizer": outer.optimizer,
        "outer.lr": outer.lr,
    }
    if outer.optimizer == "sgd":
        settings.update({"outer.momentum": outer.momentum, "outer.nesterov": outer.nesterov})
    settings.update(
        {
            "outer.codec": outer.codec.value,
            "outer.error_feedback": outer.error_feedback,
            "transport.islands": transport.islands,
            "transport.min_islands": transport.min_islands,
        }
    )
    if transport.kind.value == "grpc":
        settings["transport.aggregate"] = transport.aggregate.value
    return settings


def _one_line(text: str) -> str:
    return " ".join(text.split())
