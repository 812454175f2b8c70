"""The status document: its JSON round trip, and snapshots built from run directories whose
metrics files are written here (a local run and a 2-island torch-style run)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from status_fixtures import NOW, scripted_snapshot

from diloco.status import (
    IslandState,
    RunDescription,
    StatusSnapshot,
    StatusUnavailable,
    format_status,
    snapshot_from_run_dir,
)
from diloco.status.run_dir import LATE_FLOOR_S
from diloco.status.snapshot import finite_or_none

SETTINGS = {"outer.lr": 0.7, "outer.inner_steps": 10}


def metrics_row(round_index: int, **fields: Any) -> dict[str, Any]:
    row = {
        "round": round_index,
        "inner_step": 10 * round_index,
        "tokens": 320 * round_index,
        "train_loss": 5.0 - 0.5 * round_index,
        "val_loss": None,
        "bytes_sent": 1000 * round_index,
        "bytes_received": 1100 * round_index,
        "sync_s": 0.25,
        "compute_s": 1.5,
        "islands": 2,
        "params_sha256": f"{round_index:064x}",
        "time": NOW - 100 + round_index,
    }
    return {**row, **fields}


def write_rows(
    folder: Path, rows: list[dict[str, Any]], *, mtime: float, torn: bool = False
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in rows)
    path.write_text(text + ('{"round": 9, "tok' if torn else ""))
    os.utime(path, (mtime, mtime))


def describe(transport: str, num_islands: int) -> RunDescription:
    return RunDescription(
        run_id="unit", transport=transport, num_islands=num_islands, outer_settings=SETTINGS
    )


# --- the document ------------------------------------------------------------------------


def test_json_round_trip_keeps_every_field() -> None:
    snapshot = scripted_snapshot(
        3, 6, late=(1,), never_joined=(2,), ranks_per_island=2, fragments=3
    )
    text = snapshot.to_json()
    document = json.loads(text)
    assert document["version"] == 1
    assert document["islands"][0]["per_fragment"]["2"] == {
        "bytes_sent": snapshot.islands[0].bytes_sent // 3,
        "bytes_received": snapshot.islands[0].bytes_received // 3,
    }
    assert [island["state"] for island in document["islands"]] == [
        "active",
        "late",
        "never_joined",
    ]
    assert StatusSnapshot.from_json(text) == snapshot
    assert StatusSnapshot.from_json(text.encode()) == snapshot


def test_a_snapshot_without_coordinator_or_history_round_trips() -> None:
    bare = StatusSnapshot(
        run_id="r", transport="local", round=0, params_sha256=None, generated_at=NOW
    )
    assert StatusSnapshot.from_json(bare.to_json()) == bare
    assert json.loads(bare.to_json())["coordinator"] is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"version": 2}', "version must be 1, got 2"),
        ("[1, 2]", "version must be 1, got None"),
        ("not json", "not JSON"),
        ('{"version": 1, "run_id": "r"}', "malformed status document"),
    ],
)
def test_other_documents_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(StatusUnavailable, match=message):
        StatusSnapshot.from_json(text)


def test_an_unknown_island_state_is_malformed() -> None:
    document = json.loads(scripted_snapshot().to_json())
    document["islands"][0]["state"] = "sleeping"
    with pytest.raises(StatusUnavailable, match="malformed"):
        StatusSnapshot.from_dict(document)


def test_losses_that_are_not_finite_numbers_become_none() -> None:
    values = [1.5, 2, None, float("nan"), float("inf"), True, "3.0"]
    assert [finite_or_none(v) for v in values] == [1.5, 2.0, None, None, None, None, None]


# --- local run: one metrics.jsonl for the group ------------------------------------------


def test_local_run_gives_every_island_the_group_row(tmp_path: Path) -> None:
    rows = [metrics_row(1, val_loss=4.7), metrics_row(2), metrics_row(3, islands=4)]
    write_rows(tmp_path, rows, mtime=NOW - 5)
    snapshot = snapshot_from_run_dir(tmp_path, describe("local", 4), now=NOW)

    last = rows[-1]
    assert (snapshot.round, snapshot.params_sha256) == (3, last["params_sha256"])
    assert snapshot.transport == "local" and snapshot.outer_settings == SETTINGS
    assert not snapshot.finished and snapshot.coordinator is None
    assert [island.rank for island in snapshot.islands] == [0, 1, 2, 3]
    for island in snapshot.islands:
        assert island.state is IslandState.active
        assert island.last_round == 3 and island.last_seen == NOW - 5
        assert (island.bytes_sent, island.bytes_received) == (3000, 3300)
        assert island.train_loss == last["train_loss"] and island.tokens == last["tokens"]
        assert island.val_loss == 4.7  # the latest evaluation, from round 1
        assert island.params_sha256 == last["params_sha256"]
    history = snapshot.rounds
    assert [r.round for r in history] == [1, 2, 3]
    assert [r.participants for r in history] == [2, 2, 4]
    # local rows hold island 0's tokens: the group's are 4 times that.
    assert [r.tokens for r in history] == [4 * row["tokens"] for row in rows]
    assert [r.duration_s for r in history] == [1.75, 1.75, 1.75]
    assert [r.closed_at for r in history] == [row["time"] for row in rows]
    assert [r.val_loss for r in history] == [4.7, None, None]
    assert [r.deadline_s for r in history] == [None, None, None]


def test_local_island_is_late_after_the_floor_and_left_after_its_summary(tmp_path: Path) -> None:
    write_rows(tmp_path, [metrics_row(1), metrics_row(2)], mtime=NOW)
    run = describe("local", 2)
    just_before = snapshot_from_run_dir(tmp_path, run, now=NOW + LATE_FLOOR_S - 1)
    after = snapshot_from_run_dir(tmp_path, run, now=NOW + LATE_FLOOR_S + 1)
    assert {i.state for i in just_before.islands} == {IslandState.active}
    assert {i.state for i in after.islands} == {IslandState.late}
    short = snapshot_from_run_dir(tmp_path, run, now=NOW + 11, late_after_s=10)
    assert {i.state for i in short.islands} == {IslandState.late}

    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 1}))
    stale = snapshot_from_run_dir(tmp_path, run, now=NOW + 1000)
    assert not stale.finished  # a summary of an earlier end, before the run was extended

    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 2}))
    ended = snapshot_from_run_dir(tmp_path, run, now=NOW + 1000)
    assert ended.finished and {i.state for i in ended.islands} == {IslandState.left}


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    write_rows(tmp_path, [metrics_row(1), metrics_row(2)], mtime=NOW, torn=True)
    snapshot = snapshot_from_run_dir(tmp_path, describe("local", 1), now=NOW)
    assert snapshot.round == 2 and [r.round for r in snapshot.rounds] == [1, 2]


def test_missing_run_dir_and_missing_metrics_say_so(tmp_path: Path) -> None:
    with pytest.raises(StatusUnavailable, match="does not exist"):
        snapshot_from_run_dir(tmp_path / "nowhere", describe("local", 1))
    with pytest.raises(StatusUnavailable, match=r"no metrics yet in .*metrics\.jsonl"):
        snapshot_from_run_dir(tmp_path, describe("local", 1))
    with pytest.raises(StatusUnavailable, match=r"island-<rank>"):
        snapshot_from_run_dir(tmp_path, describe("torch", 2))


# --- torch run: run.dir/island-<rank>/metrics.jsonl --------------------------------------


def two_island_run(tmp_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows_0 = [metrics_row(r, tokens=300 * r, train_loss=4.0 - 0.1 * r) for r in (1, 2, 3)]
    rows_0[-1]["val_loss"] = 3.5
    rows_1 = [
        metrics_row(r, tokens=310 * r, train_loss=4.2 - 0.1 * r, bytes_sent=999 * r, compute_s=3.0)
        for r in (1, 2)
    ]
    write_rows(tmp_path / "island-0", rows_0, mtime=NOW - 2)
    write_rows(tmp_path / "island-1", rows_1, mtime=NOW - 500)
    return rows_0, rows_1


def test_torch_run_reads_each_island_file(tmp_path: Path) -> None:
    rows_0, rows_1 = two_island_run(tmp_path)
    snapshot = snapshot_from_run_dir(tmp_path, describe("torch", 3), now=NOW)

    assert snapshot.round == 3 and snapshot.params_sha256 == rows_0[-1]["params_sha256"]
    first, second, third = snapshot.islands
    assert (first.state, first.last_round, first.tokens) == (IslandState.active, 3, 900)
    assert (first.bytes_sent, first.val_loss) == (rows_0[-1]["bytes_sent"], 3.5)
    assert (second.state, second.last_round, second.tokens) == (IslandState.late, 2, 620)
    assert (second.bytes_sent, second.last_seen) == (1998, NOW - 500)
    assert second.params_sha256 == rows_1[-1]["params_sha256"]
    assert (third.state, third.last_round, third.last_seen) == (IslandState.never_joined, 0, None)

    history = snapshot.rounds
    assert [r.round for r in history] == [1, 2, 3]
    # Tokens are summed over islands, each at its latest row up to that round.
    assert [r.tokens for r in history] == [610, 1220, 900 + 620]
    assert history[0].train_loss == pytest.approx((3.9 + 4.1) / 2)
    assert history[2].train_loss == pytest.approx(3.7)
    assert [r.duration_s for r in history] == [3.25, 3.25, 1.75]  # the slowest island's
    assert history[2].val_loss == 3.5


def test_torch_run_finishes_when_every_joined_island_left(tmp_path: Path) -> None:
    two_island_run(tmp_path)
    (tmp_path / "island-0" / "summary.json").write_text(json.dumps({"rounds": 3}))
    assert not snapshot_from_run_dir(tmp_path, describe("torch", 2), now=NOW).finished
    (tmp_path / "island-1" / "summary.json").write_text(json.dumps({"rounds": 2}))
    ended = snapshot_from_run_dir(tmp_path, describe("torch", 2), now=NOW)
    assert ended.finished
    assert [i.state for i in ended.islands] == [IslandState.left, IslandState.left]


def test_coordinator_summary_gives_its_counts(tmp_path: Path) -> None:
    two_island_run(tmp_path)
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    summary = {
        "rounds": 3,
        "participants_per_round": [2, 1, 1],
        "late_payloads": 1,
        "refused_payloads": 2,
        "refused_calls": 3,
    }
    (coordinator / "summary.json").write_text(json.dumps(summary))
    snapshot = snapshot_from_run_dir(tmp_path, describe("grpc", 2), now=NOW)
    assert snapshot.coordinator is not None
    assert snapshot.coordinator.refused_calls == 3
    assert (snapshot.coordinator.late_payloads, snapshot.coordinator.refused_payloads) == (1, 2)
    assert snapshot.coordinator.uptime_s is None
    assert [r.participants for r in snapshot.rounds] == [2, 1, 1]


# --- the terminal table ------------------------------------------------------------------


def test_table_shows_every_island_within_100_columns() -> None:
    snapshot = scripted_snapshot(4, 12, late=(2,), never_joined=(3,), ranks_per_island=2)
    table = format_status(snapshot)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].startswith("diloco run 'demo-sites' · grpc · round 12 · running")
    assert "islands: 2 active, 1 late, 1 never_joined" in table
    island_lines = [line for line in lines if line[:4].strip().isdigit() and "site-" in line]
    assert [line.split()[0] for line in island_lines] == ["0", "1", "2"]
    assert "   3 never joined" in table and "never" in table
    assert "site-2.example.org" in table and "2 min 30 s ago" in table
    assert table.count("rank 1: sent") == 3
    assert "refused calls 1" in table
    assert "WARNING" not in table  # islands at round 12 agree; the late one is at round 10


def test_table_warns_when_islands_at_the_same_round_disagree() -> None:
    snapshot = scripted_snapshot(2, 3)
    forked = (snapshot.islands[0], replace(snapshot.islands[1], params_sha256="f" * 64))
    table = format_status(replace(snapshot, islands=forked))
    assert "WARNING: islands at round 3 disagree on params_sha256:" in table
    assert f"  {'f' * 16}… islands 1" in table
    assert f"  {snapshot.islands[0].params_sha256[:16]}… islands 0" in table


def test_table_prints_no_control_character_from_the_snapshot() -> None:
    snapshot = scripted_snapshot(2, 3)
    hostile = replace(snapshot.islands[0], host="\x1b[2Jsite\x07")
    table = format_status(replace(snapshot, run_id="run\x1b]0;x\x07", islands=(hostile,)))
    assert "\x1b" not in table and "\x07" not in table
    assert "?[2Jsite?" in table
