"""The state one process holds while it runs its islands, and the events it reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from diloco.config import IslandConfig
from diloco.metrics.jsonl import MetricsWriter
from islands.hosted import HostedIsland
from islands.ranks import IslandRanks


class RunEvents(Protocol):
    """What the CLI's progress display hears about (tests pass None)."""

    def on_start(self, total_steps: int, done_steps: int) -> None: ...
    def on_step(self) -> None: ...
    def on_round(self, row: dict[str, Any]) -> None: ...
    def on_announce(self, message: str) -> None:
        """Something the user must act on (where other islands can join this one)."""
        ...


@dataclass
class Runtime:
    """Everything one process needs to run its islands' rounds."""

    config: IslandConfig
    out_dir: Path
    device: torch.device
    hosted: list[HostedIsland]
    abort: Callable[[], None]
    val_batches: list[Any]
    numel: int
    fingerprint: Mapping[str, str]
    """What every island of the group must share (see `group_fingerprint`)."""
    metrics: MetricsWriter
    island_ranks: IslandRanks
    """This process's rank in its island and the collectives over the island's ranks."""
    tensorboard: Any = None
    wandb: Any = None
    """A `WandbLogger` when run.wandb is on."""
    timings: dict[str, float] = field(default_factory=lambda: {"compute_s": 0.0, "sync_s": 0.0})

    @property
    def num_islands(self) -> int:
        return self.config.transport.islands
