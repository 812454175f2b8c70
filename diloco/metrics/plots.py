"""loss.png: train and validation loss against tokens and against bytes sent, from metrics rows.

The left panel is the learning curve (loss per token trained, this island); the right one is
what DiLoCo trades (loss per byte of pseudo-gradient sent). Drawn with matplotlib's
object-oriented API on an Agg canvas: no pyplot, no global backend switch, no display needed.
matplotlib is optional (the `plots` extra): without it nothing is written.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SERIES = (("train_loss", "train", "-"), ("val_loss", "validation", "o-"))
"""(metrics field, legend label, line style) of each curve."""
AXES = (("tokens", "tokens (this island)"), ("bytes_sent", "bytes sent (cumulative)"))
"""(metrics field, axis label) of each panel's x axis."""


def plots_available() -> bool:
    """Whether matplotlib is installed (the caller logs once when it is not)."""
    return importlib.util.find_spec("matplotlib") is not None


def write_loss_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Draw the loss curves of metrics.jsonl `rows` into the PNG `path`.

    Rows without a value for a field (val_loss on rounds without evaluation) leave that point
    out. The file is written to a temporary name and renamed, so a reader never sees half a
    PNG.

    Returns:
        True when written; False when matplotlib is missing or there is no row to draw.
    """
    if not rows or not plots_available():
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (x_field, x_label) in zip(figure.subplots(1, 2), AXES, strict=True):
        for y_field, label, style in SERIES:
            points = _points(rows, x_field, y_field)
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, style, label=label, markersize=3)
        axes.set_xlabel(x_label)
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{len(rows)} rounds")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)
    return True


def _points(
    rows: Sequence[Mapping[str, Any]], x_field: str, y_field: str
) -> list[tuple[float, float]]:
    points = []
    for row in rows:
        x, y = row.get(x_field), row.get(y_field)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            points.append((float(x), float(y)))
    return points
