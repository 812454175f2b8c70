"""The coordinator's status tracker: events in, the snapshot's figures out
(diloco/status/tracker.py)."""

from __future__ import annotations

from typing import Any

import pytest

from diloco.status import IslandState, StatusSnapshot
from diloco.status.tracker import StatusTracker, current_rss_bytes

PAYLOAD = 1_000
ANSWER = 1_200


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def row(round_index: int, tokens: int, train: float, val: float | None = None) -> dict[str, Any]:
    return {
        "round": round_index,
        "tokens": tokens,
        "train_loss": train,
        "val_loss": val,
        "params_sha256": f"{round_index:064x}",
        "bytes_sent": 123,  # the tracker counts bytes itself: this is ignored
        "inner_lr": 1e-4,
    }


def play_round(
    tracker: StatusTracker,
    clock: Clock,
    round_index: int,
    ranks: list[int],
    rows: dict[int, dict[str, Any]] | None = None,
) -> None:
    for rank in ranks:
        clock.now += 1
        tracker.payload_received(
            rank, round_index, payload_bytes=PAYLOAD, metrics=(rows or {}).get(rank)
        )
    clock.now += 1
    tracker.round_closed(
        round_index,
        participants=len(ranks),
        params_sha256=f"{round_index:064x}",
        duration_s=2.5,
        deadline_s=30.0,
    )
    for rank in ranks:
        tracker.answer_sent(rank, payload_bytes=ANSWER)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(clock: Clock) -> StatusTracker:
    return StatusTracker(
        run_id="tracked", num_islands=3, outer_settings={"outer.lr": 0.7}, clock=clock
    )


def test_a_fresh_tracker_shows_every_island_never_joined(tracker: StatusTracker) -> None:
    snapshot = tracker.snapshot()
    assert (snapshot.round, snapshot.params_sha256, snapshot.rounds) == (0, None, ())
    assert [i.state for i in snapshot.islands] == [IslandState.never_joined] * 3
    assert snapshot.coordinator is not None and snapshot.coordinator.uptime_s == 0.0


def test_rounds_bytes_and_losses_follow_the_events(tracker: StatusTracker, clock: Clock) -> None:
    tracker.joined(0, host="site-a")
    tracker.joined(1, host="site-b")
    play_round(tracker, clock, 1, [0, 1])
    # Each payload carries the island's row of the round before.
    play_round(tracker, clock, 2, [0, 1], {0: row(1, 100, 4.0, 4.5), 1: row(1, 110, 4.2)})
    play_round(tracker, clock, 3, [0], {0: row(2, 200, 3.5)})
    clock.now += 10
    snapshot = tracker.snapshot()

    assert (snapshot.round, snapshot.params_sha256) == (3, f"{3:064x}")
    first, second, third = snapshot.islands
    assert (first.state, first.last_round, first.host) == (IslandState.active, 3, "site-a")
    assert (first.bytes_sent, first.bytes_received) == (3 * PAYLOAD, 3 * ANSWER)
    assert (first.train_loss, first.val_loss, first.tokens) == (3.5, 4.5, 200)
    assert first.params_sha256 == f"{2:064x}"
    assert (second.state, second.last_round) == (IslandState.late, 2)  # round 3 went on without it
    assert (second.bytes_sent, second.bytes_received) == (2 * PAYLOAD, 2 * ANSWER)
    assert third.state is IslandState.never_joined and third.last_seen is None

    history = snapshot.rounds
    assert [r.round for r in history] == [1, 2, 3]
    assert [r.participants for r in history] == [2, 2, 1]
    assert [r.deadline_s for r in history] == [30.0] * 3
    assert history[0].train_loss == pytest.approx(4.1) and history[0].val_loss == 4.5
    assert [r.tokens for r in history] == [210, 200 + 110, None]  # round 3's rows not yet in
    assert snapshot.coordinator is not None
    assert snapshot.coordinator.uptime_s == pytest.approx(clock.now - 1_000.0)
    assert StatusSnapshot.from_json(snapshot.to_json()) == snapshot


def test_a_newcomer_is_active_until_a_round_goes_on_without_it(
    tracker: StatusTracker, clock: Clock
) -> None:
    play_round(tracker, clock, 1, [0])
    clock.now += 5
    tracker.joined(2)
    assert tracker.snapshot().islands[2].state is IslandState.active
    play_round(tracker, clock, 2, [0])
    assert tracker.snapshot().islands[2].state is IslandState.late
    play_round(tracker, clock, 3, [0, 2])
    assert tracker.snapshot().islands[2].state is IslandState.active


def test_shards_are_summed_and_listed_with_fragments(tracker: StatusTracker) -> None:
    for shard in (0, 1):
        for fragment in (0, 1, 2):
            tracker.payload_received(0, 1, payload_bytes=100, shard=shard, fragment=fragment)
            tracker.answer_sent(0, payload_bytes=10, shard=shard, fragment=fragment)
    island = tracker.snapshot().islands[0]
    assert (island.bytes_sent, island.bytes_received) == (600, 60)
    assert [(r.rank, r.bytes_sent, r.bytes_received) for r in island.per_rank] == [
        (0, 300, 30),
        (1, 300, 30),
    ]
    assert [(f.fragment, f.bytes_sent) for f in island.per_fragment] == [
        (0, 200),
        (1, 200),
        (2, 200),
    ]
    one_rank = tracker.snapshot().islands[1]
    assert one_rank.per_rank == () and one_rank.per_fragment == ()


def test_refusals_late_payloads_leaving_and_finishing(tracker: StatusTracker, clock: Clock) -> None:
    play_round(tracker, clock, 1, [0, 1])
    tracker.late_payload(1)
    tracker.refused_payload(1)
    tracker.refused_payload()
    tracker.refused_call()
    tracker.left(0)
    tracker.left(1)
    tracker.finished()
    snapshot = tracker.snapshot()
    assert snapshot.finished
    assert [i.state for i in snapshot.islands[:2]] == [IslandState.left] * 2
    assert (snapshot.rounds[0].late, snapshot.rounds[0].refused) == (1, 1)
    figures = snapshot.coordinator
    assert figures is not None
    assert (figures.refused_calls, figures.late_payloads, figures.refused_payloads) == (1, 1, 2)


def test_a_resumed_island_replaces_its_later_rows(tracker: StatusTracker, clock: Clock) -> None:
    for round_index in (1, 2, 3):
        tracker.payload_received(
            0, round_index + 1, payload_bytes=1, metrics=row(round_index, 10 * round_index, 3.0)
        )
    tracker.payload_received(0, 3, payload_bytes=1, metrics=row(2, 25, 2.0))
    island = tracker.snapshot().islands[0]
    assert (island.tokens, island.train_loss) == (25, 2.0)


def test_rss_is_read_on_linux() -> None:
    rss = current_rss_bytes()
    assert rss is None or rss > 1_000_000


def test_a_row_keeps_only_a_hash_shaped_params_sha256(tracker: StatusTracker) -> None:
    tracker.payload_received(
        0, 2, payload_bytes=1, metrics={**row(1, 10, 3.0), "params_sha256": "\x1b[2Jgotcha"}
    )
    tracker.payload_received(1, 2, payload_bytes=1, metrics=row(1, 10, 3.0))
    islands = tracker.snapshot().islands
    assert islands[0].params_sha256 is None and islands[1].params_sha256 == f"{1:064x}"
