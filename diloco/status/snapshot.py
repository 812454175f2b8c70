"""The status document: what a run looks like right now, as one versioned JSON object.

The same JSON is served by the coordinator's status page (`GET /status.json`), rendered by the
page (`page.html`) and the terminal table (`table.py`), built from a run directory for local
and torch runs (`run_dir.py`), and checked by the tests: it is the one contract between them.
Version 1; a reader refuses any other version rather than misreading it. Within version 1
fields are only ever added, each with a default, and a reader skips fields it does not know.

Paper: DiLoCo, Douillard et al. 2023, https://arxiv.org/abs/2311.08105 (the round, islands and
outer settings shown here are the paper's).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SNAPSHOT_VERSION = 1

Scalar = str | int | float | bool | None
"""A value of the flat outer-settings mapping."""


class StatusUnavailable(RuntimeError):
    """The run cannot be read now (no run.dir, no metrics yet, coordinator unreachable, wrong
    token, a malformed document); the message is one line saying why."""


class RunUnreachable(StatusUnavailable):
    """Nothing answered at all (no coordinator listening, no DHT peer), as opposed to an
    answer that refused (a wrong token) or was not a status document."""


class IslandState(enum.Enum):
    active = "active"
    """Reported recently."""
    late = "late"
    """Joined, but silent for longer than its rounds usually take."""
    left = "left"
    """Said goodbye (or wrote its summary.json): it finished or was stopped cleanly."""
    never_joined = "never_joined"
    """Expected by the run (transport.islands) but never reported."""


@dataclass(frozen=True)
class RankBytes:
    """Payload bytes of one rank of a multi-rank island (its shard of the outer sync)."""

    rank: int
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True)
class FragmentBytes:
    """Payload bytes of one fragment of the shared parameters (Streaming DiLoCo)."""

    fragment: int
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True)
class IslandStatus:
    """One island as the group sees it; bytes are summed over the island's ranks."""

    rank: int
    state: IslandState
    last_round: int
    """Last round this island reported (0: none yet)."""
    last_seen: float | None
    """Unix seconds of its last report; None when it never reported."""
    bytes_sent: int = 0
    bytes_received: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    tokens: int | None = None
    """Tokens this island trained on, cumulative."""
    params_sha256: str | None = None
    """The shared-parameters hash of its last reported round."""
    host: str | None = None
    per_rank: tuple[RankBytes, ...] = ()
    """Bytes of each of the island's ranks; empty for a one-rank island."""
    per_fragment: tuple[FragmentBytes, ...] = ()
    """Bytes of each fragment with streaming; empty without."""


@dataclass(frozen=True)
class RoundRecord:
    """One closed round of the group."""

    round: int
    closed_at: float
    """Unix seconds."""
    duration_s: float
    """The round's wall time: since the round before it closed (a coordinator's; its first
    round seen: from its first payload), or the slowest island's inner phase plus sync (a
    run.dir's)."""
    participants: int
    late: int = 0
    """Payloads that arrived after the round closed."""
    refused: int = 0
    """Payloads refused (malformed, non-finite, wrong round)."""
    deadline_s: float | None = None
    """The deadline the round used; None for transports without one (local, torch)."""
    train_loss: float | None = None
    """Mean train loss of the round's participants."""
    val_loss: float | None = None
    tokens: int | None = None
    """Tokens of all islands together, cumulative, at this round."""
    params_sha256: str | None = None
    """The shared parameters' hash after this round (every island's must equal it)."""


@dataclass(frozen=True)
class CoordinatorFigures:
    """The coordinator's own health; None where the source cannot know it."""

    uptime_s: float | None
    rss_bytes: int | None
    refused_calls: int
    late_payloads: int = 0
    refused_payloads: int = 0


@dataclass(frozen=True)
class StatusSnapshot:
    """The whole status document (`to_json` / `from_json` are the wire form)."""

    run_id: str
    transport: str
    """transport.kind: local, torch, grpc or hivemind."""
    round: int
    """The group's round: the most advanced round closed."""
    params_sha256: str | None
    """The shared parameters' hash after that round."""
    generated_at: float
    """Unix seconds when this snapshot was built."""
    finished: bool = False
    """The run has ended (every island left, or its summary is written)."""
    outer_settings: Mapping[str, Scalar] = field(default_factory=dict)
    """Flat mapping of setting names (e.g. `outer.lr`) to values; read-only by convention."""
    islands: tuple[IslandStatus, ...] = ()
    rounds: tuple[RoundRecord, ...] = ()
    """Round history, oldest first (the source may keep only the latest ones)."""
    coordinator: CoordinatorFigures | None = None
    """None without a coordinator (local, torch, hivemind)."""
    version: int = SNAPSHOT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "run_id": self.run_id,
            "transport": self.transport,
            "round": self.round,
            "params_sha256": self.params_sha256,
            "generated_at": self.generated_at,
            "finished": self.finished,
            "outer_settings": dict(self.outer_settings),
            "islands": [_island_to_dict(island) for island in self.islands],
            "rounds": [_plain(record) for record in self.rounds],
            "coordinator": None if self.coordinator is None else _plain(self.coordinator),
        }

    def to_json(self) -> str:
        # allow_nan=False: NaN is not JSON, and browsers' JSON.parse refuses it; a non-finite
        # loss is written as null by the builders instead.
        return json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> StatusSnapshot:
        """Raises StatusUnavailable naming the field when the document is not a version-1
        status snapshot."""
        version = document.get("version") if isinstance(document, Mapping) else None
        if version != SNAPSHOT_VERSION:
            raise StatusUnavailable(
                f"status document version must be {SNAPSHOT_VERSION}, got {version!r}"
            )
        try:
            coordinator = document["coordinator"]
            return cls(
                version=SNAPSHOT_VERSION,
                run_id=str(document["run_id"]),
                transport=str(document["transport"]),
                round=int(document["round"]),
                params_sha256=document["params_sha256"],
                generated_at=float(document["generated_at"]),
                finished=bool(document["finished"]),
                outer_settings=dict(document["outer_settings"]),
                islands=tuple(_island_from_dict(item) for item in document["islands"]),
                rounds=tuple(
                    RoundRecord(**_known(RoundRecord, item)) for item in document["rounds"]
                ),
                coordinator=None
                if coordinator is None
                else CoordinatorFigures(**_known(CoordinatorFigures, coordinator)),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise StatusUnavailable(f"malformed status document: {error}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> StatusSnapshot:
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StatusUnavailable(f"status document is not JSON: {error}") from None
        return cls.from_dict(document)


def finite_or_none(value: object) -> float | None:
    """A loss as the snapshot holds it: a finite float, or None (missing, null or NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if number - number == 0 else None


def _plain(record: RoundRecord | CoordinatorFigures) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


def _island_to_dict(island: IslandStatus) -> dict[str, Any]:
    document = {name: getattr(island, name) for name in island.__dataclass_fields__}
    document["state"] = island.state.value
    document["per_rank"] = [
        {"rank": r.rank, "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received}
        for r in island.per_rank
    ]
    # A mapping in JSON, keyed by the fragment's index as a string (JSON keys are strings).
    document["per_fragment"] = {
        str(f.fragment): {"bytes_sent": f.bytes_sent, "bytes_received": f.bytes_received}
        for f in island.per_fragment
    }
    return document


def _known(record: type[Any], document: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `document` that `record` has: a field added to a later version-1 writer
    (always with a default) is skipped by an older reader instead of failing it."""
    names = {f.name for f in dataclasses.fields(record)}
    return {key: value for key, value in document.items() if key in names}


def _island_from_dict(document: Mapping[str, Any]) -> IslandStatus:
    fields = _known(IslandStatus, document)
    fields["state"] = IslandState(fields["state"])
    fields["per_rank"] = tuple(RankBytes(**item) for item in fields.get("per_rank", ()))
    fragments = fields.get("per_fragment", {})
    fields["per_fragment"] = tuple(
        sorted(
            (FragmentBytes(fragment=int(key), **value) for key, value in fragments.items()),
            key=lambda f: f.fragment,
        )
    )
    return IslandStatus(**fields)
