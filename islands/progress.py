"""The progress display: a bar on a terminal, one plain line per round otherwise."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

from diloco.config.run import Progress


def _format_row(row: dict[str, Any]) -> str:
    val = row["val_loss"]
    return (
        f"round {row['round']:>4}  step {row['inner_step']:>6}  train {row['train_loss']:.4f}  "
        f"val {'-' if val is None else f'{val:.4f}'}  sent {row['bytes_sent'] / 1e6:.1f} MB  "
        f"sync {row['sync_s']:.2f}s"
    )


class ProgressDisplay:
    """RunEvents for the CLI: writes to `stream` (stderr), never to stdout."""

    def __init__(self, mode: Progress, stream: TextIO = sys.stderr):
        self.stream = stream
        self.use_bar = mode is Progress.bar or (mode is Progress.auto and stream.isatty())
        self.quiet = mode is Progress.none
        self.bar: tqdm[Any] | None = None

    def on_start(self, total_steps: int, done_steps: int) -> None:
        if self.use_bar:
            self.bar = tqdm(
                total=total_steps,
                initial=done_steps,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
            )

    def on_step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_round(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            val = row["val_loss"]
            self.bar.set_postfix_str(
                f"round {row['round']} train {row['train_loss']:.3f}"
                + ("" if val is None else f" val {val:.3f}")
            )
        elif not self.quiet:
            print(_format_row(row), file=self.stream, flush=True)

    def on_announce(self, message: str) -> None:
        # On stdout: scripts that start islands read the address from there.
        print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
