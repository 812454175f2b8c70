"""The grpc coordinator feeds its status tracker (`grpc/status_feed.py`): rounds, hashes, bytes,
rows, refusals and lanes, driven by threads calling `Coordinator.submit` as the service does."""

from __future__ import annotations

import threading

import pytest
import torch

from diloco.codecs import build_codec
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState
from diloco.status import IslandState, StatusTracker
from diloco.transports.grpc.coordinator import Coordinator, RoundAnswer
from diloco.transports.grpc.rounds import RoundRules
from diloco.transports.grpc.status_feed import (
    CoordinatorStatus,
    Lane,
    StatusFeed,
    answer_bytes,
    parse_lane,
)

pytestmark = pytest.mark.timeout(30)

NUMEL = 40
FINGERPRINT = {"model.shapes": "abc"}
CODEC = build_codec("none")
PAYLOAD_BYTES = CODEC.payload_bytes(NUMEL)


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def new_group(
    rounds: int = 2, islands: int = 2, clock: FakeClock | None = None
) -> tuple[Coordinator, CoordinatorStatus]:
    rules = RoundRules(
        run_id="run-a", rounds=rounds, islands=islands, min_islands=2, deadline_floor_s=10.0
    )
    coordinator = Coordinator(
        rules,
        CODEC,
        SgdOuter(lr=0.7, momentum=0.9, nesterov=True),
        pinned={},
        state_dir=None,
        clock=clock or FakeClock(),
    )
    tracker = StatusTracker(run_id="run-a", num_islands=islands, outer_settings={"outer.lr": 0.7})
    status = CoordinatorStatus(tracker, rounds=rounds, refused_calls=lambda: 3)
    coordinator.status_feed = status.feed()
    for rank in range(islands):
        coordinator.join(rank, "run-a", FINGERPRINT, "", f"host-{rank}")
    generator = torch.Generator().manual_seed(0)
    anchor = torch.randn(NUMEL, generator=generator)
    assert coordinator.seed(0, SharedState(0, anchor, {"momentum": torch.zeros(NUMEL)}))
    return coordinator, status


def play_round(
    coordinator: Coordinator,
    round: int,
    rows: dict[int, dict[str, float]],
    ranks: tuple[int, ...] = (0, 1),
    clock: FakeClock | None = None,
) -> str:
    """Islands `ranks` send a payload for `round` with their rows, as the service does:
    submit, then note_metrics, then the answer goes out; with `clock`, the round closes at its
    deadline. Returns the hash the round started from."""
    sha = coordinator.state_sha256()
    answers: dict[int, RoundAnswer] = {}

    def island(rank: int) -> None:
        delta = torch.full((NUMEL,), 0.01 * (rank + 1))
        answers[rank] = coordinator.submit(rank, round, 100.0, sha, delta)
        coordinator.note_metrics(rank, rows.get(rank, {}), PAYLOAD_BYTES)
        coordinator.status_feed.answer(rank, answers[rank])

    threads = [threading.Thread(target=island, args=(rank,), daemon=True) for rank in ranks]
    for thread in threads:
        thread.start()
    if clock is not None:
        while coordinator.closer.open.round == round:  # the payloads are in: pass the deadline
            clock.now += 1.0
            coordinator.tick()
            threading.Event().wait(0.01)
    for thread in threads:
        thread.join(10)
    assert sorted(answers) == list(ranks)
    coordinator.flush()
    return sha


def row(round: int, tokens: int, loss: float) -> dict[str, float]:
    # The Average header carries every figure as a double.
    return {"round": float(round), "tokens": float(tokens), "train_loss": loss, "sync_s": 0.1}


def test_lanes_name_their_shard_and_fragment() -> None:
    assert parse_lane("") == Lane(0, None, leads=True)
    assert parse_lane("shard-1") == Lane(1, None, leads=False)
    assert parse_lane("fragment-0") == Lane(0, 0, leads=True)
    assert parse_lane("fragment-2") == Lane(0, 2, leads=False)
    assert parse_lane("shard-1.fragment-2") == Lane(1, 2, leads=False)
    assert parse_lane("fragment-2.shard-1") == Lane(1, 2, leads=False)
    assert parse_lane("fragment-0.shard-0") == Lane(0, 0, leads=True)
    for other in ("west-coast", "shard-1.shard-2", "fragment-x", "fragment-1.", "shard-1234567"):
        assert parse_lane(other) == Lane(0, None, leads=False), other


def test_rounds_hashes_bytes_and_rows_follow_the_coordinator() -> None:
    coordinator, status = new_group(rounds=2)
    play_round(coordinator, 0, {})
    after_first = coordinator.state_sha256()
    play_round(coordinator, 1, {0: row(1, 64, 3.5), 1: row(1, 64, 3.25)})
    snapshot = status.snapshot()

    assert (snapshot.round, snapshot.params_sha256) == (2, coordinator.state_sha256())
    assert snapshot.finished
    assert [r.round for r in snapshot.rounds] == [1, 2]
    assert [r.params_sha256 for r in snapshot.rounds] == [after_first, coordinator.state_sha256()]
    assert [r.participants for r in snapshot.rounds] == [2, 2]
    # Round 1's figures came with round 2's payloads (the last row of a run is never sent).
    assert (snapshot.rounds[0].train_loss, snapshot.rounds[0].tokens) == (3.375, 128)
    assert snapshot.rounds[1].train_loss is None
    for island in snapshot.islands:
        assert island.state is IslandState.active
        assert island.host == f"host-{island.rank}"
        assert (island.bytes_sent, island.bytes_received) == (2 * PAYLOAD_BYTES, 2 * PAYLOAD_BYTES)
        assert (island.last_round, island.tokens) == (2, 64)
        # The row's hash is the one its payload was computed from: the group's after round 1.
        assert island.params_sha256 == after_first
    assert snapshot.outer_settings == {"outer.lr": 0.7}
    assert snapshot.coordinator is not None and snapshot.coordinator.refused_calls == 3


def test_refused_and_late_payloads_count_in_their_round() -> None:
    clock = FakeClock()
    coordinator, status = new_group(rounds=3, islands=3, clock=clock)
    coordinator.refuse(1, "a payload of the wrong size")
    first_sha = play_round(coordinator, 0, {}, ranks=(0, 1), clock=clock)
    # Island 2 sends round 0 after it closed at its deadline, from the same parameters: late.
    late = coordinator.submit(2, 0, 100.0, first_sha, torch.zeros(NUMEL))
    assert late.late
    snapshot = status.snapshot()
    assert (snapshot.rounds[0].refused, snapshot.rounds[0].late) == (1, 1)
    figures = snapshot.coordinator
    assert figures is not None and (figures.refused_payloads, figures.late_payloads) == (1, 1)
    assert not snapshot.finished


def test_an_island_that_leaves_is_shown_left() -> None:
    coordinator, status = new_group()
    coordinator.leave(1)
    states = [island.state for island in status.snapshot().islands]
    assert states == [IslandState.active, IslandState.left]


def test_other_lanes_count_bytes_per_fragment_but_not_rounds() -> None:
    tracker = StatusTracker(run_id="r", num_islands=1, outer_settings={})
    status = CoordinatorStatus(tracker, rounds=5)
    lead, second = status.feed("fragment-0"), status.feed("fragment-1")
    for feed, nbytes in ((lead, 100), (second, 40)):
        feed.payload(0, 3, "ab" * 32)
        feed.metrics(0, row(3, 30, 2.0), nbytes)
    second.metrics(0, row(1, 10, 9.0), 40)  # a lane's stale copy of an older row: ignored
    island = tracker.snapshot().islands[0]
    assert island.bytes_sent == 180
    assert [(f.fragment, f.bytes_sent) for f in island.per_fragment] == [(0, 100), (1, 80)]
    assert (island.last_round, island.tokens, island.train_loss) == (4, 30, 2.0)


def test_the_page_stops_with_the_last_lane() -> None:
    stops: list[str] = []
    tracker = StatusTracker(run_id="r", num_islands=1, outer_settings={})
    status = CoordinatorStatus(tracker, rounds=1)
    status.stop = lambda: stops.append("stop")  # type: ignore[method-assign]
    first, second = status.feed("fragment-0"), status.feed("fragment-1")
    first.stopped()
    first.stopped()  # twice: counted once
    assert stops == []
    second.stopped()
    assert stops == ["stop"]


def test_a_feed_without_tracker_does_nothing() -> None:
    feed = StatusFeed()
    feed.joined(0, "h")
    feed.payload(0, 0, "")
    feed.metrics(0, {"round": 1.0}, 10)
    feed.late(0)
    feed.refused(0)
    feed.stopped()


def test_answer_bytes_are_the_mean_or_the_state() -> None:
    mean = RoundAnswer(1, 2, "", torch.zeros(17, dtype=torch.uint8))
    state = SharedState(3, torch.zeros(10), {"momentum": torch.zeros(10)})
    adopt = RoundAnswer(3, 2, "", None, adopt=state)
    assert (answer_bytes(mean), answer_bytes(adopt)) == (17, 80)
