"""What a restarted coordinator needs besides the shared state: the last closed round (its mean
answers late and retried payloads), the counters, and the islands with their session hashes.

The state and these travel in the keeper's checkpoint (`state_keeper.py`); membership changes at
every join and leave, so it is its own small JSON file, written at once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from diloco.checkpoint.atomic import write_atomic
from diloco.transports.grpc.answers import CoordinatorStats
from diloco.transports.grpc.closing import RoundCloser
from diloco.transports.grpc.membership import Membership
from diloco.transports.grpc.rounds import ClosedRound, OpenRound
from diloco.transports.grpc.state_keeper import StateKeeper

log = logging.getLogger(__name__)

MEMBERSHIP_FILE = "membership.json"


def persisted(last: ClosedRound | None, stats: CoordinatorStats) -> dict[str, Any]:
    """The last round and the counters, saved next to the state (tensors by reference)."""
    return {
        "last": None
        if last is None
        else {
            "round": last.round,
            "ranks": list(last.ranks),
            "mean_payload": last.mean_payload,
            "sha_before": last.sha_before,
            "sha_after": last.sha_after,
        },
        "stats": {**vars(stats), "participants": list(stats.participants)},
    }


def save_membership(state_dir: Path, membership: Membership) -> None:
    write_atomic(state_dir / MEMBERSHIP_FILE, json.dumps(membership.to_json(), sort_keys=True))


def restore(
    keeper: StateKeeper, membership: Membership, now: float
) -> tuple[ClosedRound | None, CoordinatorStats] | None:
    """Membership, the newest intact state, its last round and counters; None: nothing saved."""
    assert keeper.state_dir is not None
    path = keeper.state_dir / MEMBERSHIP_FILE
    if path.is_file():
        membership.restore(json.loads(path.read_text()), now)
    saved = keeper.restore()
    if saved is None:
        return None
    last = saved.get("last")
    closed = None
    if last is not None:
        closed = ClosedRound(
            round=int(last["round"]),
            ranks=tuple(int(r) for r in last["ranks"]),
            mean_payload=last["mean_payload"],
            sha_before=str(last["sha_before"]),
            sha_after=str(last["sha_after"]),
            first_arrival=now,
        )
    return closed, CoordinatorStats(**saved.get("stats", {}))


def restore_rounds(
    closer: RoundCloser, membership: Membership, now: float
) -> CoordinatorStats | None:
    """A restarted coordinator's rounds: `restore`d into `closer`, which opens the round after
    the saved state's; the restored counters (None: nothing was saved)."""
    keeper = closer.keeper
    restored = restore(keeper, membership, now)
    if restored is None:
        return None
    closer.last, closer.stats = restored
    closer.open = OpenRound(keeper.state.round if keeper.state else 0)
    log.warning(
        "coordinator resumed from %s at round %d with islands %s",
        keeper.state_dir,
        closer.open.round,
        sorted(membership.members),
    )
    return closer.stats
