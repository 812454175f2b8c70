"""What a coordinator has seen of its islands, kept to answer the status page.

The coordinator calls one method per event it already handles (an island joins, a payload
arrives, an answer goes out, a round closes, a call is refused, an island leaves) and hands
`snapshot` to the `StatusServer`. The tracker owns no socket and no model: it counts, under
one lock, and builds a `StatusSnapshot` on demand (at most every `cache_s` of the server).

Byte figures are counted here, as the coordinator sees its link with each island: what the
island sent (its payload up) and received (the answer down), per rank of a multi-rank island
and per fragment when the payload names one. Losses and tokens come from the metrics row
each island sends with its payload (the row of the round before).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diloco.status.run_dir import HISTORY_ROUNDS
from diloco.status.snapshot import (
    CoordinatorFigures,
    FragmentBytes,
    IslandState,
    IslandStatus,
    RankBytes,
    RoundRecord,
    Scalar,
    StatusSnapshot,
    finite_or_none,
)

logger = logging.getLogger(__name__)

_ROW_FIELDS = ("round", "tokens", "train_loss", "params_sha256")
"""What an island's line needs of its latest metrics row; the rest is dropped on arrival."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EARLY_ROUNDS = 8
"""Rounds not closed yet whose late and refused counts are kept."""


def current_rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc), or None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class _Island:
    host: str | None = None
    joined: bool = False
    left: bool = False
    last_round: int = 0
    last_seen: float | None = None
    sent: dict[int, int] = field(default_factory=dict)
    """Bytes the island sent, by rank of the island."""
    received: dict[int, int] = field(default_factory=dict)
    fragments_sent: dict[int, int] = field(default_factory=dict)
    fragments_received: dict[int, int] = field(default_factory=dict)
    row: dict[str, Any] = field(default_factory=dict)
    """The fields of its latest metrics row that its line shows."""
    val_loss: float | None = None
    """Its latest finite val loss (rows without an evaluation have none)."""


@dataclass
class _RoundRows:
    """What the islands' metrics rows of one round say, folded as they arrive, so that a
    snapshot costs one pass over the rounds rather than over every row."""

    train_loss: dict[int, float] = field(default_factory=dict)
    """By island rank."""
    val_loss: float | None = None
    tokens: dict[int, int] = field(default_factory=dict)
    """By island rank: its cumulative count at this round."""


@dataclass
class _Round:
    closed_at: float
    duration_s: float
    participants: int
    deadline_s: float | None
    params_sha256: str
    late: int = 0
    refused: int = 0


class StatusTracker:
    """Thread-safe record of the group as the coordinator sees it.

    Args:
        run_id: transport.run_id.
        num_islands: transport.islands (islands never heard from are `never_joined`).
        outer_settings: the flat settings the page shows (islands/status.py:outer_settings).
        transport: transport.kind shown by the page.
        clock: Unix seconds (injected by tests).
    """

    def __init__(
        self,
        *,
        run_id: str,
        num_islands: int,
        outer_settings: Mapping[str, Scalar],
        transport: str = "grpc",
        clock: Callable[[], float] = time.time,
    ):
        self._run_id = run_id
        self._transport = transport
        self._settings = dict(outer_settings)
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._islands = {rank: _Island() for rank in range(num_islands)}
        self._rounds: dict[int, _Round] = {}
        self._round_rows: dict[int, _RoundRows] = {}
        self._tokens_before: dict[int, int] = {}
        """By island rank: its tokens at the newest round dropped from `_round_rows`."""
        self._early: dict[int, _Round] = {}
        """Late and refused counts of rounds not closed yet (by round), moved to the round's
        record when it closes: a payload is refused while its round is open."""
        self._refused_calls = 0
        self._late_payloads = 0
        self._refused_payloads = 0
        self._finished = False

    # -- events ------------------------------------------------------------------------------

    def joined(self, rank: int, *, host: str | None = None) -> None:
        with self._lock:
            island = self._island(rank)
            island.joined, island.left = True, False
            island.host = host or island.host
            island.last_seen = self._clock()

    def payload_received(
        self,
        rank: int,
        round: int,
        *,
        payload_bytes: int,
        shard: int = 0,
        fragment: int | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Island `rank`'s payload for `round` arrived (from its rank `shard`), with its
        latest metrics row when it sends one."""
        with self._lock:
            island = self._island(rank)
            island.joined, island.left = True, False
            island.last_seen = self._clock()
            island.last_round = max(island.last_round, round)
            island.sent[shard] = island.sent.get(shard, 0) + payload_bytes
            if fragment is not None:
                island.fragments_sent[fragment] = (
                    island.fragments_sent.get(fragment, 0) + payload_bytes
                )
            if metrics is not None:
                self._add_row(rank, island, metrics)

    def answer_sent(
        self, rank: int, *, payload_bytes: int, shard: int = 0, fragment: int | None = None
    ) -> None:
        with self._lock:
            island = self._island(rank)
            island.received[shard] = island.received.get(shard, 0) + payload_bytes
            if fragment is not None:
                island.fragments_received[fragment] = (
                    island.fragments_received.get(fragment, 0) + payload_bytes
                )

    def round_closed(
        self,
        round: int,
        *,
        participants: int,
        params_sha256: str,
        duration_s: float,
        deadline_s: float | None = None,
        closed_at: float | None = None,
    ) -> None:
        """Round `round` (rounds completed, as metrics.jsonl counts them) closed; `closed_at`
        in Unix seconds (default: now)."""
        with self._lock:
            when = self._clock() if closed_at is None else closed_at
            record = _Round(when, duration_s, participants, deadline_s, params_sha256)
            early = self._early.pop(round, None)
            if early is not None:
                record.late, record.refused = early.late, early.refused
            self._rounds[round] = record
            for stale in sorted(self._rounds)[:-HISTORY_ROUNDS]:
                del self._rounds[stale]
            for stale in [r for r in self._early if r < round]:
                del self._early[stale]

    def late_payload(self, round: int | None = None) -> None:
        """A payload (for `round`, when known) arrived after its round closed."""
        with self._lock:
            self._late_payloads += 1
            if round is not None:
                self._record(round).late += 1

    def refused_payload(self, round: int | None = None) -> None:
        """A payload (of `round`, when known) was refused."""
        with self._lock:
            self._refused_payloads += 1
            if round is not None:
                self._record(round).refused += 1

    def refused_call(self) -> None:
        """A call without the run token, or otherwise refused before it was read."""
        with self._lock:
            self._refused_calls += 1

    def left(self, rank: int) -> None:
        with self._lock:
            island = self._island(rank)
            island.left = True
            island.last_seen = self._clock()

    def finished(self) -> None:
        """The run's last round closed."""
        with self._lock:
            self._finished = True

    def _record(self, round: int) -> _Round:
        """The round's record, or the counts kept for it until it closes."""
        if round in self._rounds:
            return self._rounds[round]
        if round not in self._early and len(self._early) >= _EARLY_ROUNDS:
            del self._early[min(self._early)]  # a bound, whatever rounds a caller names
        return self._early.setdefault(round, _Round(0.0, 0.0, 0, None, ""))

    def _island(self, rank: int) -> _Island:
        # An island past transport.islands is refused by the coordinator before it gets here;
        # should one slip through, it is shown rather than dropped.
        return self._islands.setdefault(rank, _Island())

    def _add_row(self, rank: int, island: _Island, metrics: Mapping[str, Any]) -> None:
        round_index = metrics.get("round")
        if not isinstance(round_index, int):
            logger.debug("status: a metrics row without a round is ignored")
            return
        if round_index < int(island.row.get("round", 0)):
            # A resumed island sends rows again from its checkpoint's round: its later ones
            # are void (rare, so a pass over the rounds is fine).
            for later in (k for k in self._round_rows if k > round_index):
                self._round_rows[later].train_loss.pop(rank, None)
                self._round_rows[later].tokens.pop(rank, None)
        island.row = {key: metrics[key] for key in _ROW_FIELDS if key in metrics}
        if not _SHA256.fullmatch(str(island.row.get("params_sha256", ""))):
            # The row comes from a semi-trusted site: keep only what looks like a hash.
            island.row.pop("params_sha256", None)
        entry = self._round_rows.setdefault(round_index, _RoundRows())
        train_loss, val_loss = (
            finite_or_none(metrics.get("train_loss")),
            finite_or_none(metrics.get("val_loss")),
        )
        if train_loss is not None:
            entry.train_loss[rank] = train_loss
        if val_loss is not None:
            entry.val_loss = island.val_loss = val_loss
        tokens = metrics.get("tokens")
        if isinstance(tokens, int):
            entry.tokens[rank] = tokens
        if len(self._round_rows) > HISTORY_ROUNDS + 100:  # trimmed in batches of 100 rounds
            for old in sorted(self._round_rows)[:-HISTORY_ROUNDS]:
                self._tokens_before.update(self._round_rows.pop(old).tokens)

    # -- the snapshot ------------------------------------------------------------------------

    def snapshot(self) -> StatusSnapshot:
        """The current status; the function to hand to `StatusServer`."""
        rss_bytes = current_rss_bytes()
        with self._lock:
            now = self._clock()
            head = max(self._rounds, default=0)
            closed_at = self._rounds[head].closed_at if head else float("-inf")
            islands = tuple(
                _island_status(rank, island, head, closed_at)
                for rank, island in sorted(self._islands.items())
            )
            return StatusSnapshot(
                run_id=self._run_id,
                transport=self._transport,
                round=head,
                params_sha256=self._rounds[head].params_sha256 if head else None,
                generated_at=now,
                finished=self._finished,
                outer_settings=dict(self._settings),
                islands=islands,
                rounds=self._history(),
                coordinator=CoordinatorFigures(
                    uptime_s=round(now - self._started, 3),
                    rss_bytes=rss_bytes,
                    refused_calls=self._refused_calls,
                    late_payloads=self._late_payloads,
                    refused_payloads=self._refused_payloads,
                ),
            )

    def _history(self) -> tuple[RoundRecord, ...]:
        """The closed rounds, with the losses and tokens the islands' rows give them. Tokens
        at round r are the sum over islands of each one's latest count at or before r."""
        latest = dict(self._tokens_before)
        total = sum(latest.values())
        from_rows: dict[int, tuple[float | None, float | None, int | None]] = {}
        for round_index in sorted(self._round_rows):
            entry = self._round_rows[round_index]
            for rank, count in entry.tokens.items():
                total += count - latest.get(rank, 0)
                latest[rank] = count
            losses = entry.train_loss.values()
            train_loss = sum(losses) / len(losses) if losses else None
            from_rows[round_index] = (train_loss, entry.val_loss, total)
        records = []
        for round_index in sorted(self._rounds):
            closed = self._rounds[round_index]
            train_loss, val_loss, tokens = from_rows.get(round_index, (None, None, None))
            records.append(
                RoundRecord(
                    round=round_index,
                    closed_at=closed.closed_at,
                    duration_s=closed.duration_s,
                    participants=closed.participants,
                    late=closed.late,
                    refused=closed.refused,
                    deadline_s=closed.deadline_s,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    tokens=tokens,
                    params_sha256=closed.params_sha256 or None,
                )
            )
        return tuple(records)


def _island_status(rank: int, island: _Island, head: int, head_closed_at: float) -> IslandStatus:
    if not island.joined:
        state = IslandState.never_joined
    elif island.left:
        state = IslandState.left
    elif island.last_round < head and (island.last_seen or 0.0) < head_closed_at:
        # It was there before the group's last round closed, and that round went on without
        # it. (An island that joined since is waiting for its first round, not late.)
        state = IslandState.late
    else:
        state = IslandState.active
    row = island.row
    shards = sorted(set(island.sent) | set(island.received))
    fragments = sorted(set(island.fragments_sent) | set(island.fragments_received))
    return IslandStatus(
        rank=rank,
        state=state,
        last_round=max(island.last_round, int(row.get("round", 0))),
        last_seen=island.last_seen,
        bytes_sent=sum(island.sent.values()),
        bytes_received=sum(island.received.values()),
        train_loss=finite_or_none(row.get("train_loss")),
        val_loss=island.val_loss,
        tokens=row.get("tokens") if isinstance(row.get("tokens"), int) else None,
        params_sha256=row.get("params_sha256"),
        host=island.host,
        per_rank=tuple(
            RankBytes(s, island.sent.get(s, 0), island.received.get(s, 0)) for s in shards
        )
        if len(shards) > 1
        else (),
        per_fragment=tuple(
            FragmentBytes(f, island.fragments_sent.get(f, 0), island.fragments_received.get(f, 0))
            for f in fragments
        ),
    )
