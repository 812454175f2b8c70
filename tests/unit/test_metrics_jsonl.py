"""metrics.jsonl: one JSON row per round, with the fields of the output contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from diloco.metrics import REQUIRED_FIELDS, MetricsWriter, read_metrics


def row(round: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {field: 0 for field in REQUIRED_FIELDS}
    base.update(round=round, train_loss=1.0 / (round + 1), val_loss=None, params_sha256="ab")
    return {**base, **extra}


def test_required_fields_are_the_output_contract() -> None:
    """The fields DESIGN.md promises scripts are the ones every row must carry."""
    assert set(REQUIRED_FIELDS) == {
        "round", "inner_step", "tokens", "train_loss", "val_loss", "bytes_sent",
        "bytes_received", "sync_s", "compute_s", "islands", "params_sha256",
    }  # fmt: skip


def test_write_then_read_rows(tmp_path: Path) -> None:
    """Rows come back in order, equal to what was written, one JSON object per line."""
    path = tmp_path / "run" / "metrics.jsonl"
    writer = MetricsWriter(path)  # creates the run directory
    rows = [row(1), row(2, extra_field=[1, 2])]
    for r in rows:
        writer.write(r)
    assert read_metrics(path) == rows
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["extra_field"] == [1, 2]


def test_read_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    """No metrics yet: no rows."""
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_writes_append_across_writers(tmp_path: Path) -> None:
    """A new writer on the same file (a resumed run) appends rather than overwrites."""
    path = tmp_path / "metrics.jsonl"
    MetricsWriter(path).write(row(1))
    MetricsWriter(path).write(row(2))
    assert [r["round"] for r in read_metrics(path)] == [1, 2]


def test_truncate_after_drops_later_rounds(tmp_path: Path) -> None:
    """Resuming from round 2: rows of rounds 3 and later are dropped, earlier ones kept."""
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    for round in range(1, 5):
        writer.write(row(round))
    writer.truncate_after(2)
    assert [r["round"] for r in read_metrics(path)] == [1, 2]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    writer.write(row(3, train_loss=9.0))
    assert [(r["round"], r["train_loss"]) for r in read_metrics(path)][-1] == (3, 9.0)


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    """A kill in the middle of a write leaves half a line: readers skip it, and truncation
    removes it."""
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write(row(1))
    with open(path, "a") as handle:
        handle.write('{"round": 2, "inner_st')
    assert [r["round"] for r in read_metrics(path)] == [1]
    writer.truncate_after(5)
    assert path.read_text() == json.dumps(row(1)) + "\n"


def test_reset_removes_the_file(tmp_path: Path) -> None:
    """A fresh run starts with no rows; resetting twice is fine."""
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write(row(1))
    writer.reset()
    writer.reset()
    assert not path.exists() and read_metrics(path) == []


def test_row_missing_a_required_field_is_our_bug(tmp_path: Path) -> None:
    """Every row carries the contract's fields; a missing one is an assertion naming it."""
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    incomplete = row(1)
    del incomplete["val_loss"], incomplete["params_sha256"]
    with pytest.raises(AssertionError, match=r"metrics row lacks \['val_loss', 'params_sha256'\]"):
        writer.write(incomplete)
    assert read_metrics(tmp_path / "metrics.jsonl") == []
