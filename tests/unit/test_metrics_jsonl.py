"""metrics.jsonl: one JSON row per round, with the fields of the output contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from diloco.metrics import REQUIRED_FIELDS, MetricsWriter, read_metrics
from diloco.metrics.jsonl import to_strict_json


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


# --- strict JSON: a non-finite float is written as null ---------------------------------------


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as browsers and jq do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_non_finite_loss_is_written_as_null(tmp_path: Path) -> None:
    """A diverged round used to write a bare NaN, which is not JSON."""
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write(row(1, train_loss=float("nan"), val_loss=float("inf")))
    writer.write(row(2, train_loss=2.5, extra={"norms": [1.0, float("-inf")]}))
    lines = path.read_text().splitlines()
    first, second = (strict_loads(line) for line in lines)
    assert first["train_loss"] is None and first["val_loss"] is None
    assert second["train_loss"] == 2.5 and second["extra"] == {"norms": [1.0, None]}


def test_truncation_rewrites_old_nan_rows_as_null(tmp_path: Path) -> None:
    """A metrics.jsonl written before the fix (bare NaN) comes out strict after a resume."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(row(1, train_loss=float("nan"))) + "\n")
    assert "NaN" in path.read_text()
    MetricsWriter(path).truncate_after(1)
    assert strict_loads(path.read_text())["train_loss"] is None


def test_to_strict_json_replaces_every_non_finite_float() -> None:
    document = {
        "a": float("nan"),
        "b": [float("inf"), 1.5, (float("-inf"), 2)],
        "c": {"d": {"e": float("nan")}, "f": "NaN"},
        "g": True,
        "h": None,
        "i": 3,
    }
    parsed = strict_loads(to_strict_json(document))
    assert parsed == {
        "a": None,
        "b": [None, 1.5, [None, 2]],
        "c": {"d": {"e": None}, "f": "NaN"},
        "g": True,
        "h": None,
        "i": 3,
    }
    assert document["a"] != document["a"], "the input is not modified"


def test_to_strict_json_keeps_json_dumps_layout() -> None:
    """Same text as json.dumps for finite data (indent passes through, as summary.json uses)."""
    document = {"round": 3, "loss": 1.25, "rows": [1, 2]}
    assert to_strict_json(document) == json.dumps(document)
    assert to_strict_json(document, indent=2) == json.dumps(document, indent=2)
    assert to_strict_json(float("nan")) == "null"


def test_numpy_floats_are_covered() -> None:
    """np.float64 is a float; np.float32 is not, but is a number all the same."""
    np = pytest.importorskip("numpy")
    parsed = strict_loads(to_strict_json({"a": np.float64("nan"), "b": np.float32("inf")}))
    assert parsed == {"a": None, "b": None}
    assert strict_loads(to_strict_json({"c": np.float32(0.5)})) == {"c": 0.5}
