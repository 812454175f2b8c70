"""A status snapshot read from a run directory: what local and torch runs have instead of a
coordinator.

Layouts (docs/output.md): `local` writes `run.dir/metrics.jsonl` once for the whole group (the
row is the group's; its per-island figures are island 0's); `torch` (and grpc or hivemind
islands sharing a disk) write `run.dir/island-<rank>/metrics.jsonl`. `summary.json` beside a
metrics file means that process finished; `run.dir/coordinator/summary.json` holds a finished
grpc coordinator's counts.

An island whose metrics file has not changed for `late_after_s` is `late`: by default the
larger of `LATE_FLOOR_S` and `LATE_SLACK` times its recent rounds' wall time, so slow rounds
are not called late and a stalled island is noticed within a few rounds.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diloco.metrics import read_metrics
from diloco.status.snapshot import (
    CoordinatorFigures,
    IslandState,
    IslandStatus,
    RoundRecord,
    Scalar,
    StatusSnapshot,
    StatusUnavailable,
    finite_or_none,
)

logger = logging.getLogger(__name__)

LATE_FLOOR_S = 60.0
"""Never call an island late before it has been silent this long."""
LATE_SLACK = 3.0
"""...nor before this many times its recent rounds' wall time."""
HISTORY_ROUNDS = 1000
"""Round history kept in a snapshot (the newest ones): the page plots every point."""


@dataclass(frozen=True)
class RunDescription:
    """What the config says about the run; the files say the rest."""

    run_id: str
    transport: str
    """transport.kind: `local` reads run.dir/metrics.jsonl, any other run.dir/island-<rank>/."""
    num_islands: int
    outer_settings: Mapping[str, Scalar]


@dataclass(frozen=True)
class _IslandFiles:
    rank: int
    rows: list[dict[str, Any]]
    mtime: float | None
    summary: dict[str, Any] | None


def snapshot_from_run_dir(
    run_dir: Path,
    run: RunDescription,
    *,
    now: float | None = None,
    late_after_s: float | None = None,
) -> StatusSnapshot:
    """Build the snapshot of the run whose outputs are in `run_dir`.

    Args:
        run_dir: the config's run.dir.
        run: run id, transport kind, island count and outer settings from the config.
        now: Unix seconds to judge lateness against (default: the clock).
        late_after_s: silence after which an island is late (default: adaptive, see module).

    Raises:
        StatusUnavailable: no run_dir, or no metrics row written yet.
    """
    now = time.time() if now is None else now
    if not run_dir.is_dir():
        raise StatusUnavailable(f"run.dir {run_dir} does not exist (has the run started?)")
    if run.transport == "local":
        files = [_read_island(run_dir, rank=0)]
        pattern = run_dir / "metrics.jsonl"
    else:
        files = [_read_island(run_dir / f"island-{r}", rank=r) for r in range(run.num_islands)]
        pattern = run_dir / "island-<rank>" / "metrics.jsonl"
    if not any(f.rows for f in files):
        raise StatusUnavailable(f"no metrics yet in {pattern}")
    if run.transport == "local":
        group_size = run.num_islands
        # One process hosts every island: each gets the group's row.
        statuses = [
            _island_status(files[0], now, late_after_s, rank=r) for r in range(run.num_islands)
        ]
    else:
        group_size = 1
        statuses = [_island_status(f, now, late_after_s, rank=f.rank) for f in files]
    rounds = round_history([f.rows for f in files], tokens_scale=group_size)
    coordinator_summary = _read_json(run_dir / "coordinator" / "summary.json")
    if coordinator_summary is not None:
        rounds = _with_coordinator_participants(rounds, coordinator_summary)
    head = max(statuses, key=lambda s: s.last_round)
    joined = [s for s in statuses if s.state is not IslandState.never_joined]
    return StatusSnapshot(
        run_id=run.run_id,
        transport=run.transport,
        round=head.last_round,
        params_sha256=head.params_sha256,
        generated_at=now,
        finished=all(s.state is IslandState.left for s in joined),
        outer_settings=dict(run.outer_settings),
        islands=tuple(statuses),
        rounds=tuple(rounds[-HISTORY_ROUNDS:]),
        coordinator=_coordinator_figures(coordinator_summary),
    )


def _read_island(folder: Path, *, rank: int) -> _IslandFiles:
    path = folder / "metrics.jsonl"
    rows = [row for row in read_metrics(path) if isinstance(row.get("round"), int)]
    try:
        mtime: float | None = path.stat().st_mtime
    except OSError:
        mtime = None
    return _IslandFiles(rank, rows, mtime, _read_json(folder / "summary.json"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        # Summaries are written to a temporary file and renamed, so this is damage, not a race.
        logger.warning("status: cannot read %s: %s", path, error)
        return None
    return document if isinstance(document, dict) else None


def _island_status(
    files: _IslandFiles, now: float, late_after_s: float | None, *, rank: int
) -> IslandStatus:
    if not files.rows:
        return IslandStatus(rank=rank, state=IslandState.never_joined, last_round=0, last_seen=None)
    last = files.rows[-1]
    last_round = int(last["round"])
    last_seen = files.mtime if files.mtime is not None else float(last.get("time", now))
    # A summary from an earlier end of a run extended since (outer.rounds raised) is stale.
    finished = files.summary is not None and int(files.summary.get("rounds", 0)) >= last_round
    if finished:
        state = IslandState.left
    else:
        limit_s = late_after_s if late_after_s is not None else _late_after_s(files.rows)
        state = IslandState.late if now - last_seen > limit_s else IslandState.active
    return IslandStatus(
        rank=rank,
        state=state,
        last_round=last_round,
        last_seen=last_seen,
        bytes_sent=int(last.get("bytes_sent", 0)),
        bytes_received=int(last.get("bytes_received", 0)),
        train_loss=finite_or_none(last.get("train_loss")),
        val_loss=_latest_val_loss(files.rows),
        tokens=_int_or_none(last.get("tokens")),
        params_sha256=last.get("params_sha256"),
    )


def _late_after_s(rows: Sequence[dict[str, Any]]) -> float:
    recent = [_round_wall_s(row) for row in rows[-3:]]
    return max(LATE_FLOOR_S, LATE_SLACK * max(recent, default=0.0))


def _round_wall_s(row: Mapping[str, Any]) -> float:
    """A round's wall time: its inner phase plus its sync (evaluation and saving excluded)."""
    return float(row.get("compute_s") or 0.0) + float(row.get("sync_s") or 0.0)


def _latest_val_loss(rows: Sequence[dict[str, Any]]) -> float | None:
    # val_loss is null in rounds without an evaluation (eval.every): show the latest one.
    for row in reversed(rows):
        value = finite_or_none(row.get("val_loss"))
        if value is not None:
            return value
    return None


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def round_history(
    rows_per_island: Sequence[Sequence[Mapping[str, Any]]], *, tokens_scale: int = 1
) -> list[RoundRecord]:
    """One record per round any island wrote a metrics row for, oldest first.

    Train loss is the mean over the rows of that round, val loss and params_sha256 the first
    one there (the islands agree on the hash, or the table warns); tokens at round r are the
    sum over islands of each one's latest count at or before r (an island that stalled still
    counts what it trained), times `tokens_scale` (local runs, whose rows hold island 0's
    count). Duration is the slowest row's inner phase plus sync.
    """
    by_round: dict[int, list[Mapping[str, Any]]] = {}
    for rows in rows_per_island:
        for row in rows:
            by_round.setdefault(int(row["round"]), []).append(row)
    cumulative = [_tokens_by_round(rows) for rows in rows_per_island if rows]
    records = []
    for round_index in sorted(by_round):
        rows = by_round[round_index]
        train = _finite_values(rows, "train_loss")
        val = _finite_values(rows, "val_loss")
        tokens = sum(_tokens_at(rounds, counts, round_index) for rounds, counts in cumulative)
        records.append(
            RoundRecord(
                round=round_index,
                closed_at=max(float(row.get("time", 0.0)) for row in rows),
                duration_s=round(max(_round_wall_s(row) for row in rows), 6),
                participants=max(int(row.get("islands", 1)) for row in rows),
                train_loss=sum(train) / len(train) if train else None,
                val_loss=val[0] if val else None,
                tokens=tokens * tokens_scale,
                params_sha256=_first_hash(rows),
            )
        )
    return records


def _first_hash(rows: Sequence[Mapping[str, Any]]) -> str | None:
    return next((str(row["params_sha256"]) for row in rows if row.get("params_sha256")), None)


def _finite_values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    values = (finite_or_none(row.get(key)) for row in rows)
    return [value for value in values if value is not None]


def _tokens_by_round(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    ordered = sorted((int(row["round"]), _int_or_none(row.get("tokens")) or 0) for row in rows)
    return [r for r, _ in ordered], [t for _, t in ordered]


def _tokens_at(rounds: list[int], counts: list[int], round_index: int) -> int:
    position = bisect.bisect_right(rounds, round_index)
    return counts[position - 1] if position else 0


def _coordinator_figures(summary: dict[str, Any] | None) -> CoordinatorFigures | None:
    """A finished grpc coordinator's counts (its summary.json has no uptime or RSS)."""
    if summary is None:
        return None
    return CoordinatorFigures(
        uptime_s=None,
        rss_bytes=None,
        refused_calls=int(summary.get("refused_calls", 0)),
        late_payloads=int(summary.get("late_payloads", 0)),
        refused_payloads=int(summary.get("refused_payloads", 0)),
    )


def _with_coordinator_participants(
    records: list[RoundRecord], summary: dict[str, Any]
) -> list[RoundRecord]:
    """The coordinator counted each round's participants; the islands' rows agree unless one
    of them missed rounds, so its figures win where they line up with rounds 1..N."""
    participants = summary.get("participants_per_round")
    if not isinstance(participants, list) or len(participants) != summary.get("rounds"):
        return records
    return [
        dataclasses.replace(r, participants=int(participants[r.round - 1]))
        if 1 <= r.round <= len(participants)
        else r
        for r in records
    ]
