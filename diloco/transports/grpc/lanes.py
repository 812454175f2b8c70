"""Lanes: independent exchange groups that one grpc coordinator hosts, a `Coordinator` each.

An island that makes several exchanges per round opens one lane for each: one per fragment of
Streaming DiLoCo (Douillard et al. 2025, https://arxiv.org/abs/2501.18512), one per rank of a
multi-rank island, or both. A lane has its own membership, rounds, shared state (its slice of
the anchor and of the outer optimizer's state) and persistence, under
`<state_dir>/lanes/<lane>/`; the main lane "" keeps the coordinator's own paths, so runs
without lanes look as they always did.

Lane names are opaque to the coordinator (`LANE_NAME`); an island sends its lane in the
`x-diloco-lane` metadata of every call. A name that does not match is refused before anything
is allocated. A lane is created by the first valid Join that names it, up to `max_lanes`
besides the main one: a Join for one more is refused and counted, so no caller can make the
coordinator allocate without limit. A restarted coordinator reopens the lanes it saved.
Every lane's fingerprint is pinned like the main lane's, except `parameters`: the size of the
lane's slice is set by the first island that joins it, and checked for every other one.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from diloco.transports.base import GroupMismatchError
from diloco.transports.grpc.coordinator import PARAMETERS_KEY, Coordinator

log = logging.getLogger(__name__)

T = TypeVar("T")

MAIN_LANE = ""
LANE_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
"""A lane's name: lowercase letters, digits, dots and dashes (fragment-1, shard-2.fragment-0)."""
LANES_DIR = "lanes"
SESSION_FILE = "grpc-session"


class InvalidLane(ValueError):
    """A lane name that does not match LANE_NAME."""


class LaneLimit(GroupMismatchError):
    """The coordinator hosts as many lanes as transport.grpc.max_lanes allows."""


def check_lane(name: str) -> str:
    """`name` if it is "" (the main lane) or matches LANE_NAME; InvalidLane otherwise."""
    if name == MAIN_LANE or LANE_NAME.fullmatch(name):
        return name
    raise InvalidLane(
        f"lane {name[:80]!r} is not a lane name (lowercase letters, digits, '.', '-'; at most 64)"
    )


def lane_dir(state_dir: Path | None, lane: str) -> Path | None:
    """Where a lane's state is persisted: the main lane's is `state_dir` itself."""
    if state_dir is None or lane == MAIN_LANE:
        return state_dir
    return state_dir / LANES_DIR / check_lane(lane)


def session_file(island_dir: Path, lane: str) -> Path:
    """An island's saved session for `lane`: grpc-session, or grpc-session-<lane>."""
    return island_dir / (SESSION_FILE if lane == MAIN_LANE else f"{SESSION_FILE}-{lane}")


def lane_fingerprint(fingerprint: Mapping[str, str], numel: int) -> dict[str, str]:
    """What an island presents when it joins a lane: its fingerprint, with `parameters` the
    size of the lane's slice."""
    return {**fingerprint, PARAMETERS_KEY: str(numel)}


def lane_pinned(pinned: Mapping[str, str]) -> dict[str, str]:
    """A lane's pinned fingerprint: the main lane's, whose `parameters` (the whole model's)
    is not a lane's; the first island to join the lane sets it."""
    return {key: value for key, value in pinned.items() if key != PARAMETERS_KEY}


class LaneRegistry:
    """The coordinator's lanes: the main one and at most `max_lanes` more. Thread-safe.

    Args:
        main: the main lane's coordinator (the one a server is built with).
        max_lanes: lanes besides the main one (transport.grpc.max_lanes).
        factory: builds a lane's coordinator; default: one like `main` (its rules, codec,
            outer optimizer and pinned fingerprint), persisted under `lane_dir`.
    """

    def __init__(
        self,
        main: Coordinator,
        max_lanes: int,
        factory: Callable[[str], Coordinator] | None = None,
    ):
        self.main = main
        self.max_lanes = max_lanes
        self._factory = factory or self._like_main
        self._lanes: dict[str, Coordinator] = {}
        self._listeners: list[Callable[[str, Coordinator], None]] = []
        self._lock = threading.RLock()
        self.refused = 0
        """Joins refused for a lane past max_lanes, and calls naming an invalid lane."""
        self._reopen_saved()

    def get(self, lane: str) -> Coordinator | None:
        """The coordinator of `lane` if the registry holds it."""
        if lane == MAIN_LANE:
            return self.main
        with self._lock:
            return self._lanes.get(lane)

    def join(
        self,
        lane: str,
        join: Callable[[Coordinator], T],
        fingerprint: Mapping[str, str] | None = None,
    ) -> T:
        """`join(coordinator of lane)`; a lane not seen yet is created for it, and kept only
        if the join succeeds (a refused Join leaves nothing behind).

        Raises:
            InvalidLane: a name that does not match LANE_NAME.
            LaneLimit: a new lane past max_lanes.
            GroupMismatchError: `fingerprint` differs from the run's (what every lane's first
                island presented, `parameters` aside): e.g. a site of one rank in the main lane
                and a site of two in lanes shard-0 and shard-1 would each wait for the other.
        """
        check_lane(lane)
        with self._lock:
            if fingerprint is not None:
                self._check_run_fingerprint(lane, fingerprint)
            existing = self.get(lane)
            if existing is not None:
                return join(existing)
            if len(self._lanes) >= self.max_lanes:
                self.refused += 1
                log.warning("refused a join to lane %r: %d lanes are open", lane, self.max_lanes)
                raise LaneLimit(
                    f"the coordinator hosts transport.grpc.max_lanes={self.max_lanes} lanes "
                    f"besides the main one; lane {lane!r} would be one more"
                )
            created = self._factory(lane)
            answer = join(created)
            self._add(lane, created)
            log.info("lane %r opened", lane)
            return answer

    def _check_run_fingerprint(self, lane: str, fingerprint: Mapping[str, str]) -> None:
        """Every lane of a run holds islands of one fingerprint; the first pinned one is the
        run's (a lane's `parameters` is its own slice's size, not compared). When that is
        `lane` itself, its own join checks (membership.py)."""
        for name, coordinator in self.items():
            group = coordinator.membership.fingerprint
            if group is not None and name == lane:
                return
            if group is not None:
                ours, theirs = lane_pinned(group), lane_pinned(fingerprint)
                keys = sorted(set(ours) | set(theirs))
                differing = [key for key in keys if ours.get(key) != theirs.get(key)]
                if differing:
                    # The refusal names keys only, never the run's values (issue 12).
                    names = ", ".join(
                        k[:64] if k.isprintable() else repr(k[:40]) for k in differing
                    )
                    log.error(
                        "refused a join to lane %r: its fingerprint differs from the run's: %s",
                        lane,
                        "; ".join(
                            f"{k[:64]!r}: run {str(ours.get(k))[:64]!r}, "
                            f"island {str(theirs.get(k))[:64]!r}"
                            for k in differing
                        ),
                    )
                    raise GroupMismatchError(
                        f"the island differs from the run's islands and cannot join; "
                        f"differing keys: {names}"
                    )
                return

    def add_listener(self, listener: Callable[[str, Coordinator], None]) -> None:
        """Call `listener(lane, coordinator)` for every lane, the main one included: those
        open now, and each one opened later (e.g. to feed it to the status page)."""
        with self._lock:
            self._listeners.append(listener)
            opened = self.items()
        for lane, coordinator in opened:
            listener(lane, coordinator)

    def items(self) -> list[tuple[str, Coordinator]]:
        """(name, coordinator) of every lane: the main one first, then by name."""
        with self._lock:
            return [(MAIN_LANE, self.main), *sorted(self._lanes.items())]

    def count_invalid(self) -> None:
        with self._lock:
            self.refused += 1

    def finished(self) -> bool:
        """Every lane that holds a state has closed its last round (and one holds a state)."""
        used = [c for _, c in self.items() if c.has_state()]
        return bool(used) and all(c.finished() for c in used)

    def everyone_left(self, but: int | None = None) -> bool:
        """Every island but `but` (an island hosting the coordinator: its own lanes leave
        after it stops waiting) has left every lane it joined."""
        return all(c.everyone_left(but) for _, c in self.items() if c.has_members())

    def tick(self) -> None:
        for _, coordinator in self.items():
            coordinator.tick()

    def stop(self) -> None:
        for _, coordinator in self.items():
            coordinator.stop()

    def summary(self) -> dict[str, dict[str, Any]]:
        """Each lane but the main one: its round, its shared parameters' hash, and how many
        islands each of its rounds averaged."""
        return {
            lane: {
                "round": coordinator.round,
                "params_sha256": coordinator.state_sha256(),
                "participants_per_round": list(coordinator.stats.participants),
            }
            for lane, coordinator in self.items()
            if lane != MAIN_LANE
        }

    def _add(self, lane: str, coordinator: Coordinator) -> None:
        self._lanes[lane] = coordinator
        for listener in self._listeners:
            listener(lane, coordinator)

    def _like_main(self, lane: str) -> Coordinator:
        main = self.main
        return Coordinator(
            main.rules,
            main.codec,
            main.keeper.optimizer,
            pinned=lane_pinned(main.membership.pinned),
            state_dir=lane_dir(main.keeper.state_dir, lane),
            clock=main.clock,
            lane=lane,
        )

    def _reopen_saved(self) -> None:
        """A restarted coordinator carries on with the lanes it persisted (at most max_lanes:
        the others are left on disk, and logged)."""
        state_dir = self.main.keeper.state_dir
        folder = None if state_dir is None else state_dir / LANES_DIR
        if folder is None or not folder.is_dir():
            return
        names = sorted(
            p.name for p in folder.iterdir() if p.is_dir() and LANE_NAME.fullmatch(p.name)
        )
        for lane in names[: self.max_lanes]:
            self._add(lane, self._factory(lane))
        if len(names) > self.max_lanes:
            log.error(
                "%s holds %d lanes, transport.grpc.max_lanes=%d: lanes %s are not reopened",
                folder,
                len(names),
                self.max_lanes,
                names[self.max_lanes :],
            )
