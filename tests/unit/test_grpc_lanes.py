"""Lanes of the grpc coordinator (`grpc/lanes.py`): names, the registry's bound, and what each
lane keeps apart (membership, state, persistence). No grpc, no sockets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from diloco.codecs import build_codec
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.base import GroupMismatchError
from diloco.transports.grpc.coordinator import Coordinator
from diloco.transports.grpc.lanes import (
    InvalidLane,
    LaneLimit,
    LaneRegistry,
    check_lane,
    lane_dir,
    lane_fingerprint,
    lane_pinned,
    session_file,
)
from diloco.transports.grpc.rounds import RefusedPayload, RoundRules

pytestmark = pytest.mark.timeout(30)

SGD = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
PINNED = {"model": "m1", "parameters": "100", "initial weights": "0123456789abcdef"}
RULES = RoundRules(run_id="run", rounds=5, islands=2, min_islands=1)


def main_coordinator(state_dir: Path | None = None) -> Coordinator:
    return Coordinator(RULES, build_codec("none"), SGD, pinned=PINNED, state_dir=state_dir)


def join(
    rank: int, numel: int, fingerprint: dict[str, str] | None = None
) -> Callable[[Coordinator], Coordinator]:
    """What the registry runs in a lane: island `rank` joins it with a lane's fingerprint."""

    def run(coordinator: Coordinator) -> Coordinator:
        coordinator.join(rank, "run", fingerprint or lane_fingerprint(PINNED, numel), "", "h")
        return coordinator

    return run


def slice_state(numel: int, round: int = 0) -> SharedState:
    anchor = torch.arange(numel, dtype=torch.float32)
    return SharedState(round, anchor, {"momentum": torch.zeros(numel)})


@pytest.mark.parametrize(
    "name", ["", "fragment-0", "shard-3", "fragment-1.shard-2", "a", "0" * 64, "x.y-z"]
)
def test_lane_names_that_are_accepted(name: str) -> None:
    assert check_lane(name) == name


@pytest.mark.parametrize(
    "name", ["-a", ".a", "A", "fragment_1", "a/b", "../x", "a b", "é", "a\n", "0" * 65]
)
def test_lane_names_that_are_refused_name_the_rule(name: str) -> None:
    with pytest.raises(InvalidLane, match="is not a lane name"):
        check_lane(name)


def test_paths_of_the_main_lane_are_unchanged_and_lanes_get_their_own(tmp_path: Path) -> None:
    assert lane_dir(tmp_path, "") == tmp_path
    assert lane_dir(tmp_path, "fragment-1") == tmp_path / "lanes" / "fragment-1"
    assert lane_dir(None, "fragment-1") is None
    assert session_file(tmp_path, "") == tmp_path / "grpc-session"
    assert session_file(tmp_path, "fragment-1") == tmp_path / "grpc-session-fragment-1"


def test_a_lane_fingerprint_carries_the_lanes_size_and_its_pin_drops_the_models() -> None:
    assert lane_fingerprint(PINNED, 7) == {**PINNED, "parameters": "7"}
    assert lane_pinned(PINNED) == {"model": "m1", "initial weights": "0123456789abcdef"}


def test_a_join_opens_a_lane_of_its_own_membership_and_state() -> None:
    registry = LaneRegistry(main_coordinator(), max_lanes=4)
    lane = registry.join("fragment-0", join(0, 30))
    assert registry.get("fragment-0") is lane and lane.lane == "fragment-0"
    assert registry.join("fragment-0", join(1, 30)) is lane  # the same lane, not a new one
    assert sorted(lane.membership.members) == [0, 1]
    assert registry.main.membership.members == {}
    # The lane's slice seeds it; the main lane holds nothing.
    assert lane.seed(0, slice_state(30)) and lane.numel == 30
    assert not registry.main.has_state()
    assert [name for name, _ in registry.items()] == ["", "fragment-0"]


def test_the_size_of_a_lane_is_pinned_by_its_first_island() -> None:
    registry = LaneRegistry(main_coordinator(), max_lanes=4)
    registry.join("fragment-0", join(0, 30))
    with pytest.raises(GroupMismatchError, match="differing keys: parameters"):
        registry.join("fragment-0", join(1, 31))
    # The main lane's pins still hold in a lane (the model, its initial weights).
    other = {**lane_fingerprint(PINNED, 30), "model": "m2"}
    with pytest.raises(GroupMismatchError, match="differing keys: model"):
        registry.join("fragment-0", join(1, 30, other))


def test_a_lane_past_the_bound_is_refused_and_counted_and_allocates_nothing() -> None:
    made: list[str] = []
    main = main_coordinator()

    def factory(lane: str) -> Coordinator:
        made.append(lane)
        return Coordinator(RULES, build_codec("none"), SGD, pinned={}, state_dir=None, lane=lane)

    registry = LaneRegistry(main, max_lanes=2, factory=factory)
    registry.join("fragment-0", join(0, 10))
    registry.join("fragment-1", join(0, 10))
    with pytest.raises(LaneLimit, match=r"max_lanes=2 lanes besides the main one"):
        registry.join("fragment-2", join(0, 10))
    assert made == ["fragment-0", "fragment-1"] and registry.refused == 1
    assert registry.get("fragment-2") is None
    registry.join("fragment-1", join(1, 10))  # lanes that exist still take joins
    assert registry.join("", join(1, 100)) is main  # and so does the main lane


def test_a_refused_join_leaves_no_lane_behind() -> None:
    registry = LaneRegistry(main_coordinator(), max_lanes=1)
    with pytest.raises(GroupMismatchError, match="differing keys: model"):
        registry.join("fragment-0", join(0, 10, {**lane_fingerprint(PINNED, 10), "model": "m2"}))
    assert registry.get("fragment-0") is None
    registry.join("fragment-1", join(0, 10))  # its slot is free
    with pytest.raises(InvalidLane):
        registry.join("Fragment", join(0, 10))


def test_a_lanes_seed_at_round_zero_is_not_checked_against_the_models_initial_weights() -> None:
    """A lane's state is a slice of the model: the fingerprint's hash of the whole model's
    initial weights cannot check it (the main lane's seed still is)."""
    registry = LaneRegistry(main_coordinator(), max_lanes=1)
    lane = registry.join("fragment-0", join(0, 100))
    assert lane.seed(0, slice_state(100))
    registry.join("", join(0, 100, dict(PINNED)))
    with pytest.raises(RefusedPayload, match="initial weights"):
        registry.main.seed(0, slice_state(100))


def test_finished_and_everyone_left_look_at_every_lane_in_use() -> None:
    registry = LaneRegistry(main_coordinator(), max_lanes=2)
    assert not registry.finished()  # nothing holds a state yet
    lanes = [registry.join(f"fragment-{i}", join(0, 10)) for i in range(2)]
    for lane in lanes:
        registry.join(lane.lane, join(1, 10))
        lane.seed(0, slice_state(10, round=RULES.rounds))
    assert registry.finished()  # the main lane is unused: it does not hold the run back
    lanes[0].leave(0)
    lanes[1].leave(0)
    lanes[0].leave(1)
    assert not registry.everyone_left()
    assert registry.everyone_left(but=1)  # the host's own lanes leave after it stops waiting
    lanes[1].leave(1)
    assert registry.everyone_left()


def test_a_restarted_registry_reopens_the_lanes_it_persisted(tmp_path: Path) -> None:
    state_dir = tmp_path / "coordinator"
    registry = LaneRegistry(main_coordinator(state_dir), max_lanes=2)
    lane = registry.join("fragment-1", join(0, 10))
    assert lane.seed(0, slice_state(10))
    assert (state_dir / "lanes" / "fragment-1").is_dir()
    (state_dir / "lanes" / "not a lane").mkdir()  # never reopened: not a lane's name

    again = LaneRegistry(main_coordinator(state_dir), max_lanes=2)
    reopened = again.get("fragment-1")
    assert reopened is not None and reopened.has_state()
    assert reopened.state_sha256() == params_sha256(slice_state(10).anchor)
    assert [name for name, _ in again.items()] == ["", "fragment-1"]
    assert again.summary() == {
        "fragment-1": {
            "round": 0,
            "params_sha256": params_sha256(slice_state(10).anchor),
            "participants_per_round": [],
        }
    }


def test_listeners_see_every_lane_open_now_and_later() -> None:
    registry = LaneRegistry(main_coordinator(), max_lanes=2)
    registry.join("fragment-0", join(0, 10))
    seen: list[str] = []
    registry.add_listener(lambda lane, coordinator: seen.append(lane))
    registry.join("fragment-1", join(0, 10))
    assert seen == ["", "fragment-0", "fragment-1"]
