"""A hivemind run's status from its islands' DHT records (diloco/transports/hivemind/status.py):
what an island publishes, the tags a run token puts on them, and the snapshot they make."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("hivemind")

from diloco.status import IslandState, RunDescription  # noqa: E402
from diloco.transports.hivemind.auth import RunToken  # noqa: E402
from diloco.transports.hivemind.records import (  # noqa: E402
    read_status_records,
    run_key,
    status_key,
)
from diloco.transports.hivemind.status import (  # noqa: E402
    HISTORY_ROUNDS,
    IslandStatusRecord,
    is_lead_lane,
    snapshot_from_records,
)

RUN = RunDescription(run_id="e2e", transport="hivemind", num_islands=3, outer_settings={})
SHA = [f"{i:064x}" for i in range(40)]
TOKEN = "hivemind-status-token-0123456789"


def island_record(rank: int, rounds: int, tokens_per_round: int = 640) -> IslandStatusRecord:
    """An island that ran `rounds` rounds as transport.py drives its record."""
    record = IslandStatusRecord(rank, host=f"site-{rank}")
    for done in range(1, rounds + 1):
        if done > 1:
            record.note_hash(done - 1, SHA[done - 1])  # the next round starts from that row
        record.note_result(2, 100, 100)
        record.note_row(
            {
                "round": float(done),
                "tokens": float(tokens_per_round * done),
                "train_loss": 4.0 - 0.1 * done - 0.01 * rank,
                "val_loss": 3.5 if done % 2 == 0 else float("nan"),
                "bytes_sent": 100.0 * done,
            }
        )
    return record


class FakeDHT:
    """`get` as hivemind's DHT answers a dictionary record: {subkey: value-with-expiration}."""

    def __init__(self, records: dict[str, Any]):
        self.records = records
        self.asked: list[str] = []

    def get(self, key: str, latest: bool = False) -> Any:
        self.asked.append(key)
        wrapped = {peer: SimpleNamespace(value=value) for peer, value in self.records.items()}
        return SimpleNamespace(value=wrapped)


def test_the_lead_lane_is_the_first_of_each_kind() -> None:
    assert [is_lead_lane(lane) for lane in ("", "fragment-0", "shard-0.fragment-0")] == [True] * 3
    assert not is_lead_lane("fragment-1") and not is_lead_lane("shard-2")


def test_a_record_holds_the_recent_rows_and_their_hashes() -> None:
    value = island_record(0, rounds=HISTORY_ROUNDS + 5).value()
    history = value["history"]
    assert len(history) == HISTORY_ROUNDS
    assert [entry[0] for entry in history] == list(range(6, HISTORY_ROUNDS + 6))
    last = history[-1]
    assert last[1:4] == [640 * (HISTORY_ROUNDS + 5), pytest.approx(0.3), None]
    assert last[5] == 2 and last[6] is None  # its hash is known when the next round starts
    assert history[-2][6] == SHA[HISTORY_ROUNDS + 4]
    assert (value["bytes_sent"], value["bytes_received"], value["host"]) == (
        100 * (HISTORY_ROUNDS + 5),
        100 * (HISTORY_ROUNDS + 5),  # not in the row: the transport's own count
        "site-0",
    )


def test_a_resumed_island_replaces_its_later_rows() -> None:
    record = island_record(0, rounds=5)
    record.note_row({"round": 3.0, "tokens": 1.0, "train_loss": 9.0})
    assert [entry[0] for entry in record.value()["history"]] == [1, 2, 3]


def test_records_make_islands_and_rounds() -> None:
    records = {"peer-a": island_record(0, 6).value(), "peer-b": island_record(1, 5).value()}
    snapshot = snapshot_from_records(records, RUN, now=records["peer-a"]["time"] + 1.0)
    assert (snapshot.transport, snapshot.round) == ("hivemind", 6)
    assert snapshot.coordinator is None
    zero, one, two = snapshot.islands
    assert (zero.state, zero.last_round, zero.tokens, zero.host) == (
        IslandState.active,
        6,
        3840,
        "site-0",
    )
    assert (one.last_round, one.params_sha256) == (5, None)
    assert two.state is IslandState.never_joined
    assert [r.round for r in snapshot.rounds] == [1, 2, 3, 4, 5, 6]
    assert snapshot.rounds[4].params_sha256 == SHA[5] and snapshot.rounds[4].tokens == 2 * 3200
    assert snapshot.rounds[1].val_loss == 3.5 and snapshot.rounds[0].val_loss is None
    assert snapshot.rounds[0].participants == 2


def test_an_island_silent_past_the_floor_is_late() -> None:
    record = island_record(0, 3).value()
    snapshot = snapshot_from_records({"p": record}, RUN, now=record["time"] + 600)
    assert snapshot.islands[0].state is IslandState.late


def test_records_of_other_ranks_and_shapes_are_left_out() -> None:
    good = island_record(0, 2).value()
    records = {"a": good, "b": {**good, "rank": 99}, "c": {**good, "history": [[1, "x"]]}}
    snapshot = snapshot_from_records(records, RUN)
    assert [island.state for island in snapshot.islands] == [
        IslandState.active,
        IslandState.never_joined,
        IslandState.never_joined,
    ]


def test_with_a_run_token_only_tagged_records_count() -> None:
    token = RunToken(TOKEN, run_key("e2e"))
    body = island_record(0, 2).value()
    forged = {**island_record(1, 2).value(), "tag": "0" * 64}
    tagged = {**body, "tag": token.sign("status", "peer-a", body)}
    dht = FakeDHT({"peer-a": tagged, "peer-b": forged, "peer-c": "not a record"})
    records, untagged = read_status_records(dht, "e2e", token)  # type: ignore[arg-type]
    assert (list(records), untagged) == (["peer-a"], 1)
    assert records["peer-a"] == body
    assert dht.asked == [status_key(run_key("e2e"))]
    # Without a token every record is read; a tag copied to another peer is worthless.
    moved = {"peer-b": tagged}
    assert read_status_records(FakeDHT(moved), "e2e", token)[1] == 1  # type: ignore[arg-type]
    assert len(read_status_records(FakeDHT(moved), "e2e", None)[0]) == 1  # type: ignore[arg-type]
