"""The grpc coordinator's status: a `StatusTracker` fed from the events the coordinator already
handles, answered by the `Status` call and, with `transport.grpc.status_listen`, served as a
page by a read-only `StatusServer` (diloco/status/server.py says how it is bounded and who may
read it). Issue 17; the rounds shown are DiLoCo's (https://arxiv.org/abs/2311.08105).

No grpc here: `Coordinator` calls its `StatusFeed` (a no-op one until `attach_status` gives it
a live one), and the service's `Status` call answers `CoordinatorStatus.snapshot_json`.

Rounds: the coordinator counts open rounds from 0, the status document counts rounds
completed, as metrics.jsonl does: closing the coordinator's round k completes round k + 1.
Each island's metrics row arrives with its next payload, so the last row of a run is never
seen here (its round's hash and figures are the coordinator's own).

Lanes (one `Coordinator` per lane): each lane's coordinator gets a feed of its own, and all
feed the one tracker. A lane named `shard-<r>` carries rank r's shard of multi-rank islands,
`fragment-<f>` fragment f of Streaming DiLoCo, `fragment-<f>.shard-<r>` both: bytes are
counted per shard and fragment, and summed per island. Only the lead lane (shard 0, fragment
0 or none) records the group's rounds and the islands' rows: the other lanes close rounds of
their own, and their copies of an island's rows may arrive out of order.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diloco.checkpoint.atomic import write_atomic
from diloco.status.server import StatusServer
from diloco.status.snapshot import Scalar, StatusSnapshot
from diloco.status.tracker import StatusTracker
from diloco.transports.grpc.answers import RoundAnswer
from diloco.transports.grpc.rounds import ClosedRound

if TYPE_CHECKING:
    from diloco.transports.base import TransportSetup
    from diloco.transports.grpc.coordinator import Coordinator
    from diloco.transports.grpc.service import CoordinatorServer

log = logging.getLogger(__name__)

STATUS_ADDRESS_FILE = "status-address"
"""In the coordinator's folder: `host:port` of its status page while it serves one."""
MAX_HOST_CHARS = 128
_INDEX = re.compile(r"[0-9]{1,6}")
_ROW_INTS = ("round", "tokens", "inner_step")
"""Row fields that are counts (the Average header carries every figure as a double)."""


@dataclass(frozen=True)
class Lane:
    """What a lane carries: rank `shard` of its islands, and `fragment` (None: all of it)."""

    shard: int = 0
    fragment: int | None = None
    leads: bool = True
    """This lane records the group's rounds and the islands' rows."""


def parse_lane(name: str) -> Lane:
    """The lane a name says (`""`, `shard-1`, `fragment-2`, `fragment-2.shard-1`, in either
    order). A name of another form is counted as shard 0 of the whole vector, and does not
    lead."""
    indices: dict[str, int] = {}
    for part in name.split(".") if name else ():
        kind, _, index = part.partition("-")
        if kind not in ("shard", "fragment") or not _INDEX.fullmatch(index) or kind in indices:
            log.warning("status: lane %r is not fragment-<f>.shard-<r>: counted as shard 0", name)
            return Lane(leads=False)
        indices[kind] = int(index)
    shard, fragment = indices.get("shard", 0), indices.get("fragment")
    return Lane(shard, fragment, leads=shard == 0 and not fragment)


def answer_bytes(answer: RoundAnswer) -> int:
    """The payload bytes an answer carries: the mean, or the state to adopt."""
    if answer.adopt is not None:
        return sum(t.numel() * t.element_size() for _, t in answer.adopt.tensors())
    return 0 if answer.mean_payload is None else int(answer.mean_payload.numel())


class StatusFeed:
    """One coordinator's (lane's) events, handed to the tracker; a no-op without one.

    Args:
        tracker: the tracker every lane of the coordinator feeds; None: a feed that does nothing.
        lane: the lane's name (`parse_lane`).
        rounds: outer.rounds (the run is finished once the lead lane closed the last one).
        on_stop: called once when the coordinator stops.
    """

    def __init__(
        self,
        tracker: StatusTracker | None = None,
        *,
        lane: str = "",
        rounds: int = 0,
        on_stop: Callable[[], None] | None = None,
    ):
        self._tracker = tracker
        self.lane = parse_lane(lane)
        self._rounds = rounds
        self._on_stop = on_stop
        self._hashes: dict[int, str] = {}
        """By island rank: the params_sha256 its last payload was computed from."""
        self._last_closed_at: float | None = None
        self._lock = threading.Lock()

    def joined(self, rank: int, host: str) -> None:
        if self._tracker is not None:
            self._tracker.joined(rank, host=host[:MAX_HOST_CHARS] or None)

    def left(self, rank: int) -> None:
        # An island is in the group until it leaves its lead lane (its others leave with it).
        if self._tracker is not None and self.lane.leads:
            self._tracker.left(rank)

    def payload(self, rank: int, round: int, params_sha256: str) -> None:
        """Island `rank`'s payload for the coordinator's `round` arrived, computed from the
        shared parameters `params_sha256` (those of its latest metrics row)."""
        if self._tracker is None:
            return
        with self._lock:
            self._hashes[rank] = params_sha256
        self._tracker.payload_received(
            rank, round + 1 if self.lane.leads else 0, payload_bytes=0, **self._where()
        )

    def metrics(self, rank: int, metrics: Mapping[str, float], received_bytes: int) -> None:
        """The payload's bytes, once read, and the island's latest metrics row it carried."""
        if self._tracker is None:
            return
        row = None
        if self.lane.leads and metrics:
            with self._lock:
                row = _row(metrics, self._hashes.get(rank, ""))
        self._tracker.payload_received(
            rank, 0, payload_bytes=received_bytes, metrics=row, **self._where()
        )

    def answer(self, rank: int, answer: RoundAnswer) -> None:
        """An answer went out to island `rank` in full."""
        if self._tracker is not None:
            self._tracker.answer_sent(rank, payload_bytes=answer_bytes(answer), **self._where())

    def round_closed(self, closed: ClosedRound) -> None:
        """A round closed and its outer step is done (`closed.sha_after` is set)."""
        if self._tracker is None or not self.lane.leads:
            return
        completed = closed.round + 1
        # A round's wall time runs from the close before it (inner steps, then the wait for
        # every payload); the first one seen knows only its wait.
        since = self._last_closed_at
        self._last_closed_at = closed.closed_at
        duration_s = closed.duration_s if since is None else closed.closed_at - since
        self._tracker.round_closed(
            completed,
            participants=closed.participants,
            params_sha256=closed.sha_after,
            duration_s=round(duration_s, 6),
            deadline_s=closed.deadline_s,
            closed_at=closed.closed_at,
        )
        if completed >= self._rounds:
            self._tracker.finished()

    def late(self, round: int) -> None:
        """A payload for the coordinator's `round` came after it closed."""
        if self._tracker is not None:
            self._tracker.late_payload(round + 1 if self.lane.leads else None)

    def refused(self, round: int) -> None:
        """A payload (or state) was refused while the coordinator's `round` was open."""
        if self._tracker is not None:
            self._tracker.refused_payload(round + 1 if self.lane.leads else None)

    def stopped(self) -> None:
        """The coordinator stopped (the page stops with the last of its lanes)."""
        with self._lock:
            on_stop, self._on_stop = self._on_stop, None
        if on_stop is not None:
            on_stop()

    def _where(self) -> dict[str, Any]:
        return {"shard": self.lane.shard, "fragment": self.lane.fragment}


def _row(metrics: Mapping[str, float], params_sha256: str) -> dict[str, Any]:
    """A metrics row as the island wrote it, from the header's doubles."""
    row: dict[str, Any] = dict(metrics)
    for key in _ROW_INTS:
        value = row.get(key)
        if isinstance(value, float) and value.is_integer():
            row[key] = int(value)
    if params_sha256:
        row["params_sha256"] = params_sha256
    return row


class CoordinatorStatus:
    """The status of one coordinator, all its lanes together: the tracker, the document the
    `Status` call answers, and the page when one is served.

    Args:
        tracker: what the coordinator's feeds record.
        rounds: outer.rounds.
        refused_calls: the server's count of refused calls (token, session, call limits).
    """

    def __init__(
        self,
        tracker: StatusTracker,
        *,
        rounds: int,
        refused_calls: Callable[[], int] = lambda: 0,
    ):
        self.tracker = tracker
        self._rounds = rounds
        self._refused_calls = refused_calls
        self._lock = threading.Lock()
        self._open_feeds = 0
        self.server: StatusServer | None = None
        self._address_file: Path | None = None

    def feed(self, lane: str = "") -> StatusFeed:
        """A feed for one lane's coordinator; the page stops once every feed has stopped."""
        with self._lock:
            self._open_feeds += 1
        return StatusFeed(self.tracker, lane=lane, rounds=self._rounds, on_stop=self._feed_stopped)

    def snapshot(self) -> StatusSnapshot:
        snapshot = self.tracker.snapshot()
        figures = snapshot.coordinator
        if figures is None:
            return snapshot
        refused = figures.refused_calls + self._refused_calls()
        figures = dataclasses.replace(figures, refused_calls=refused)
        return dataclasses.replace(snapshot, coordinator=figures)

    def snapshot_json(self) -> str:
        return self.snapshot().to_json()

    def serve(self, listen: str, *, token: str | None, address_file: Path) -> StatusServer:
        """Start the page on `listen` and write where it is to `address_file`.

        Raises:
            ConfigError: `listen` is malformed, or not loopback and there is no token.
            OSError: the address cannot be bound.
        """
        server = StatusServer(listen, self.snapshot, token=token)
        server.start()
        self.server, self._address_file = server, address_file
        write_atomic(address_file, server.url.removeprefix("http://").rstrip("/") + "\n")
        return server

    def stop(self) -> None:
        """Stop the page (if any) and remove its address file. Safe to call twice."""
        with self._lock:
            server, self.server = self.server, None
            address_file, self._address_file = self._address_file, None
        if address_file is not None:
            address_file.unlink(missing_ok=True)
        if server is not None:
            server.stop()

    def _feed_stopped(self) -> None:
        with self._lock:
            self._open_feeds -= 1
            last = self._open_feeds <= 0
        if last:
            self.stop()


def status_settings(setup: TransportSetup) -> dict[str, Scalar]:
    """The settings the page shows: the group settings the coordinator checks at every join
    (`"outer.codec, block_size"` split into `outer.codec`, `outer.block_size`), and its own."""
    settings: dict[str, Scalar] = {}
    for names, value in setup.group_settings.items():
        keys, values = names.split(", "), value.split(", ")
        if len(keys) > 1 and len(keys) == len(values):
            section = keys[0].rpartition(".")[0]
            for key, item in zip(keys, values, strict=True):
                settings[key if "." in key else f"{section}.{key}"] = item
        else:
            settings[names] = value
    transport = setup.config
    settings["transport.min_islands"] = transport.min_islands
    settings["transport.aggregate"] = transport.aggregate.value
    return settings


def refused_calls(server: CoordinatorServer) -> int:
    """Calls the server refused: for the token, for a session or rank, past the call limits,
    for a lane (malformed, or one past transport.grpc.max_lanes)."""
    service = server.service
    return (
        server.refused_calls + service.refused_calls + service.limits.refused + server.lanes.refused
    )


def attach_status(
    server: CoordinatorServer, setup: TransportSetup, token: str, state_dir: Path
) -> CoordinatorStatus:
    """Feed a tracker from `server`'s coordinator, answer its `Status` call from it, and
    serve the page when `transport.grpc.status_listen` is set (announced once, never with the
    token; its `host:port` in `state_dir/status-address`, the coordinator's folder)."""
    tracker = StatusTracker(
        run_id=setup.config.run_id,
        num_islands=setup.config.islands,
        outer_settings=status_settings(setup),
        transport="grpc",
    )
    status = CoordinatorStatus(
        tracker, rounds=setup.rounds, refused_calls=lambda: refused_calls(server)
    )

    def feed(lane: str, coordinator: Coordinator) -> None:
        coordinator.status_feed = status.feed(lane)

    server.lanes.add_listener(feed)  # every lane, those opened later too
    server.service.status_json = status.snapshot_json
    listen = setup.config.grpc.status_listen
    if listen:
        page = status.serve(listen, token=token, address_file=state_dir / STATUS_ADDRESS_FILE)
        setup.announce(f"the run's status page: {page.url}")
    return status
