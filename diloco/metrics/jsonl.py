"""metrics.jsonl: one JSON object per outer round (the output contract, docs/output.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REQUIRED_FIELDS = (
    "round",
    "inner_step",
    "tokens",
    "train_loss",
    "val_loss",
    "bytes_sent",
    "bytes_received",
    "sync_s",
    "compute_s",
    "islands",
    "params_sha256",
)


class MetricsWriter:
    """Appends rows to `path`, one line each, flushed so a kill loses at most the last row."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, round: int) -> None:
        """Drop rows past `round` (written after the checkpoint a resumed run starts from)."""
        rows = [row for row in read_metrics(self.path) if row["round"] <= round]
        temporary = self.path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(temporary, self.path)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        missing = [field for field in REQUIRED_FIELDS if field not in row]
        assert not missing, f"metrics row lacks {missing}"
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete row of a metrics.jsonl (a torn last line is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
