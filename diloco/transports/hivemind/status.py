"""A hivemind run's status, without a coordinator: each island publishes a small status record
in the DHT, and `diloco-island status` reads them all back as one `StatusSnapshot` (issue 17).

An island's record (`IslandStatusRecord`, under `<run>.status`, its peer id the subkey,
records.py) holds its rank, host, bytes and its last `HISTORY_ROUNDS` metrics rows in short
(round, tokens, train and val loss, wall time, participants, and the hash of the shared
parameters the row ends on), so that the status has the table and plots a coordinator's has.
The row of round r is noted when islands/loop.py writes it; its hash is the one the island
averages round r + 1 from, known when that round starts (`average`), so the record is stored
at both moments (not awaited: a few hundred bytes).
Only the island's lead lane publishes (its other lanes carry fragments of the same rounds).
With a run token each record carries a tag (auth.py) and readers ignore records without a
valid one, as they do the other records.

Reading (`read_status`): a DHT node in client mode joins through transport.hivemind's
initial peers (the initial_peers_file, or the address_file island 0 writes), gets the records
and leaves. hivemind DHT: https://github.com/learning-at-home/hivemind (1.1.12).
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Mapping
from typing import Any

from diloco.status.run_dir import LATE_FLOOR_S, LATE_SLACK, RunDescription, round_history
from diloco.status.snapshot import (
    IslandState,
    IslandStatus,
    RunUnreachable,
    StatusSnapshot,
    StatusUnavailable,
    finite_or_none,
)
from diloco.transports.hivemind.auth import RunToken
from diloco.transports.hivemind.config import HivemindTransportConfig

log = logging.getLogger(__name__)

HISTORY_ROUNDS = 32
"""Rows an island's record keeps: what the plots show of a hivemind run."""
RECORD_VERSION = 1
MAX_HOST_CHARS = 128
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_lead_lane(lane: str) -> bool:
    """The island's first lane ("", fragment-0, shard-0, ...): the one whose record counts."""
    return all(int(index) == 0 for index in re.findall(r"\d+", lane))


class IslandStatusRecord:
    """What one island publishes about itself; `value()` is the DHT value (without its tag)."""

    def __init__(self, rank: int, lane: str = "", host: str | None = None):
        self.rank = rank
        self.lane = lane
        self.host = (host if host is not None else socket.gethostname())[:MAX_HOST_CHARS]
        self._row: dict[str, Any] = {}
        self._history: list[list[Any]] = []
        self._participants = 0
        self._bytes = [0, 0]
        self._noted_at: float | None = None

    def note_result(self, participants: int, bytes_sent: int, bytes_received: int) -> None:
        """A round's average ended (the row noted next is that round's)."""
        self._participants = participants
        self._bytes[0] += bytes_sent
        self._bytes[1] += bytes_received

    def note_row(self, metrics: Mapping[str, float]) -> None:
        """The island's latest metrics row (the figures islands/loop.py reports)."""
        now = time.time()
        round_index = metrics.get("round")
        if round_index is None or not float(round_index).is_integer():
            return
        wall_s = 0.0 if self._noted_at is None else now - self._noted_at
        self._noted_at = now
        self._row = {key: float(value) for key, value in metrics.items()}
        entry = [
            int(round_index),
            int(metrics.get("tokens", 0)),
            finite_or_none(metrics.get("train_loss")),
            finite_or_none(metrics.get("val_loss")),
            round(wall_s, 3),
            self._participants,
            None,
        ]
        # A resumed island starts its rows again from its checkpoint's round.
        self._history = [e for e in self._history if e[0] < entry[0]][-HISTORY_ROUNDS + 1 :]
        self._history.append(entry)

    def note_hash(self, round: int, sha: str) -> None:
        """The island averages round `round` (0-based: `round` rounds done) from `sha`: the
        hash its row of round `round` ends on."""
        for entry in reversed(self._history):
            if entry[0] == round:
                entry[6] = sha
                break

    def value(self) -> dict[str, Any]:
        row = self._row
        return {
            "v": RECORD_VERSION,
            "rank": self.rank,
            "lane": self.lane,
            "host": self.host,
            "time": round(time.time(), 3),
            "tokens": int(row.get("tokens", 0)),
            "train_loss": finite_or_none(row.get("train_loss")),
            "bytes_sent": int(row.get("bytes_sent", self._bytes[0])),
            "bytes_received": int(row.get("bytes_received", self._bytes[1])),
            "history": [list(entry) for entry in self._history],
        }


def read_status(
    settings: HivemindTransportConfig, run: RunDescription, token: str | None
) -> StatusSnapshot:
    """The run's snapshot from its islands' records in the DHT.

    Raises:
        RunUnreachable: no initial peer configured, or none answers.
        StatusUnavailable: no island published a record (with a valid tag, given a token).
    """
    from diloco.transports.hivemind.records import read_status_records

    peers = _initial_peers(settings)
    if not peers:
        raise RunUnreachable(
            "no island to ask: set transport.hivemind.initial_peers, initial_peers_file or "
            "address_file (island 0's)"
        )
    dht, sockets = _start_reader(settings, peers)
    try:
        records, untagged = read_status_records(dht, run.run_id, _run_token(token, run.run_id))
    finally:
        dht.shutdown()
        sockets.close()
    if not records:
        why = (
            f"; {untagged} record(s) carry no valid tag for this run token "
            "(transport.hivemind.token_env / token_file)"
            if untagged
            else ""
        )
        raise StatusUnavailable(f"no island of run {run.run_id!r} published its status yet{why}")
    return snapshot_from_records(records, run)


def snapshot_from_records(
    records: Mapping[str, Mapping[str, Any]], run: RunDescription, now: float | None = None
) -> StatusSnapshot:
    """The snapshot the islands' records (by peer id) make: one island per rank (its newest
    record), rounds from their histories."""
    now = time.time() if now is None else now
    newest: dict[int, Mapping[str, Any]] = {}
    for record in records.values():
        rank = record.get("rank")
        # Ranks past the run's islands are not the run's (a record is anyone's to write
        # without a run token): they are left out.
        if not isinstance(rank, int) or not 0 <= rank < run.num_islands:
            continue
        if rank not in newest or _time(record) > _time(newest[rank]):
            newest[rank] = record
    rows = {rank: _history_rows(record) for rank, record in newest.items()}
    islands = [
        _island(rank, newest.get(rank), rows.get(rank, []), now) for rank in range(run.num_islands)
    ]
    history = round_history([r for r in rows.values() if r])
    head = max((island.last_round for island in islands), default=0)
    head_sha = next((r.params_sha256 for r in history if r.round == head), None)
    return StatusSnapshot(
        run_id=run.run_id,
        transport=run.transport,
        round=head,
        params_sha256=head_sha,
        generated_at=now,
        outer_settings=dict(run.outer_settings),
        islands=tuple(islands),
        rounds=tuple(history),
    )


def _time(record: Mapping[str, Any]) -> float:
    value = record.get("time")
    return float(value) if isinstance(value, int | float) else 0.0


def _history_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An island's history as metrics rows (what `round_history` reads)."""
    rows = []
    history = record.get("history")
    for entry in history[-HISTORY_ROUNDS:] if isinstance(history, list) else []:
        if not isinstance(entry, list) or len(entry) != 7 or not isinstance(entry[0], int):
            continue
        round_index, tokens, train_loss, val_loss, wall_s, participants, sha = entry
        rows.append(
            {
                "round": round_index,
                "tokens": tokens if isinstance(tokens, int) else 0,
                "train_loss": finite_or_none(train_loss),
                "val_loss": finite_or_none(val_loss),
                "sync_s": finite_or_none(wall_s) or 0.0,
                "islands": participants if isinstance(participants, int) else 1,
                "params_sha256": sha if isinstance(sha, str) and _SHA256.fullmatch(sha) else "",
                "time": _time(record),
            }
        )
    return rows


def _island(
    rank: int, record: Mapping[str, Any] | None, rows: list[dict[str, Any]], now: float
) -> IslandStatus:
    if record is None or not rows:
        return IslandStatus(rank=rank, state=IslandState.never_joined, last_round=0, last_seen=None)
    last_seen = _time(record)
    recent = max((float(row["sync_s"]) for row in rows[-3:]), default=0.0)
    late = now - last_seen > max(LATE_FLOOR_S, LATE_SLACK * recent)
    host = record.get("host")
    return IslandStatus(
        rank=rank,
        state=IslandState.late if late else IslandState.active,
        last_round=int(rows[-1]["round"]),
        last_seen=last_seen,
        bytes_sent=_count(record.get("bytes_sent")),
        bytes_received=_count(record.get("bytes_received")),
        train_loss=rows[-1]["train_loss"],
        val_loss=next((r["val_loss"] for r in reversed(rows) if r["val_loss"] is not None), None),
        tokens=rows[-1]["tokens"],
        params_sha256=rows[-1]["params_sha256"] or None,
        host=str(host)[:MAX_HOST_CHARS] if isinstance(host, str) else None,
    )


def _count(value: object) -> int:
    return int(value) if isinstance(value, int) and value >= 0 else 0


def _run_token(token: str | None, run_id: str) -> RunToken | None:
    from diloco.transports.hivemind.records import run_key

    return RunToken(token, run_key(run_id)) if token else None


def _initial_peers(settings: HivemindTransportConfig) -> list[str]:
    """The configured peers, and the multiaddrs in the peers and address files (no waiting:
    a status reader asks a running group)."""
    peers = list(settings.initial_peers)
    for path in (settings.initial_peers_file, settings.address_file):
        if not path:
            continue
        try:
            with open(path) as file:
                peers += [line.strip() for line in file if line.strip()]
        except OSError:
            log.info("status: %s cannot be read (no island wrote it yet?)", path)
    return list(dict.fromkeys(peers))


def _start_reader(settings: HivemindTransportConfig, peers: list[str]) -> tuple[Any, Any]:
    """A client-mode DHT node joined through `peers`, and its socket directory."""
    from diloco.transports.hivemind.averager import IslandDHT
    from diloco.transports.hivemind.sockets import SocketDir

    sockets = SocketDir()
    try:
        dht = IslandDHT(
            initial_peers=peers,
            start=True,
            client_mode=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            use_relay=settings.use_relay,
            socket_prefix=sockets.p2p_prefix,
        )
    except Exception as error:
        sockets.close()
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise RunUnreachable(f"no island answers at {', '.join(peers)[:200]}: {reason}") from None
    return dht, sockets
