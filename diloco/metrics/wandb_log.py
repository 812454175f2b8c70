"""Weights & Biases logging of the metrics rows (`run.wandb`), beside metrics.jsonl.

Each row is logged with the same field names as metrics.jsonl (numbers only: the hash and
other text stay in the file), at step = tokens, so that runs with different batch sizes or H
line up. The wandb run id is kept in run_dir/wandb-run-id: a resumed island continues the
same wandb run (wandb drops the re-logged rows whose step it has already seen, and a resume is
bit-exact, so nothing is lost). Islands of a multi-process run each log their own run, grouped
under the run.dir's name.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diloco.errors import ConfigError
from diloco.extras import require_extra
from diloco.metrics.wandb_config import KEY, WandbConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb-run-id"
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


class WandbLogger:
    """One open wandb run; `open` starts or resumes it, `close` finishes it."""

    def __init__(self, run: Any):
        self._run = run

    @classmethod
    def open(
        cls, config: WandbConfig, run_dir: Path, resolved_config: Mapping[str, Any]
    ) -> WandbLogger | None:
        """Start (or resume) the wandb run of `run_dir`; None when run.wandb is off.

        Args:
            config: the run.wandb section.
            run_dir: this island's output directory; wandb writes under run_dir/wandb.
            resolved_config: the whole resolved config, recorded as the run's config.

        Raises:
            ConfigError: wandb is not installed, or cannot start (e.g. online without a login).
        """
        if not config.enabled:
            return None
        wandb = require_extra("wandb", key=f"{KEY}.project", extra="wandb")
        run_dir.mkdir(parents=True, exist_ok=True)
        group = run_dir.parent.name if run_dir.name.startswith("island-") else run_dir.name
        run_id = _run_id(run_dir)
        try:
            run = wandb.init(
                project=config.project,
                name=config.name or (f"{group}-{run_dir.name}" if group != run_dir.name else group),
                group=group,
                mode=config.mode.value,
                dir=str(run_dir),
                config=dict(resolved_config),
                id=run_id,
                resume="allow",
                # silent: the library never prints; console off: leave stdout/stderr alone.
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as error:  # wandb raises many kinds for a login or network problem
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else error
            hint = (
                f"; run `wandb login`, or set {KEY}.mode=offline"
                if config.mode.value == "online"
                else ""
            )
            raise ConfigError(
                f"{KEY}.mode {config.mode.value}: wandb could not start ({first_line}){hint}"
            ) from None
        log.info("wandb run %s (%s) in %s", run.id, config.mode.value, run_dir / "wandb")
        return cls(run)

    def log(self, row: Mapping[str, Any]) -> None:
        """Log a metrics row's finite numbers at step = its tokens."""
        numbers = {key: value for key, value in row.items() if _is_number(value)}
        self._run.log(numbers, step=int(row["tokens"]))

    def close(self) -> None:
        self._run.finish()


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _run_id(run_dir: Path) -> str:
    """This run directory's wandb id, created once (so a resume continues the same run)."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(8))  # wandb's own id form
    temporary = path.with_name(f".{RUN_ID_FILE}.tmp")
    temporary.write_text(run_id + "\n")
    os.replace(temporary, path)
    return run_id
