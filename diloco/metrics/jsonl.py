"""metrics.jsonl: one JSON object per outer round (the output contract, docs/output.md).

Rows are strict JSON (RFC 8259, https://www.rfc-editor.org/rfc/rfc8259#section-6): a
non-finite float, such as the loss of a diverged round, is written as `null`. Python's
`json.dumps` would write a bare `NaN` / `Infinity`, which jq, browsers and most other readers
refuse. `to_strict_json` is the one writer of JSON outputs (summary.json included).
"""

from __future__ import annotations

import json
import math
import numbers
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
        temporary.write_text("".join(to_strict_json(row) + "\n" for row in rows))
        os.replace(temporary, self.path)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        missing = [field for field in REQUIRED_FIELDS if field not in row]
        assert not missing, f"metrics row lacks {missing}"
        with open(self.path, "a") as handle:
            handle.write(to_strict_json(row) + "\n")
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


def to_strict_json(document: Any, *, indent: int | None = None) -> str:
    """`json.dumps(document)`, with every non-finite float written as `null`.

    Args:
        document: dicts, lists, tuples, strings, numbers, booleans and None, nested freely;
            numpy scalars count as numbers. It is not modified.
        indent: as `json.dumps` (summary.json uses 2).

    Raises:
        TypeError: something in `document` that JSON cannot hold (as `json.dumps`).
    """
    return json.dumps(finite_or_null(document), indent=indent, allow_nan=False)


def finite_or_null(document: Any) -> Any:
    """A copy of `document` whose non-finite floats are None (a numpy scalar becomes a
    Python number), ready for `json.dumps(..., allow_nan=False)`."""
    if isinstance(document, (str, bool, int)) or document is None:
        return document
    if isinstance(document, numbers.Integral):
        return int(document)
    if isinstance(document, numbers.Real):
        value = float(document)
        return value if math.isfinite(value) else None
    if isinstance(document, dict):
        return {key: finite_or_null(value) for key, value in document.items()}
    if isinstance(document, (list, tuple)):
        return [finite_or_null(value) for value in document]
    return document  # json.dumps names what it cannot hold
