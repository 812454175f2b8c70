"""The selector protocol: which examples of a super-batch the inner loop trains on.

Selection is local to each island and never crosses the network. `uniform` keeps everything;
`jest` (issue #6) scores a larger super-batch with the learner and a frozen reference model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from diloco.data.base import Batch

if TYPE_CHECKING:
    from diloco.data.config import DataConfig
    from diloco.models.config import ModelConfig


@dataclass
class SelectorCost:
    """What selecting has cost so far, cumulative (written to metrics.jsonl)."""

    scoring_flops: int = 0
    """Forward FLOPs of scoring super-batches (learner and reference)."""
    scoring_s: float = 0.0
    """Wall time of scoring and choosing, seconds."""
    reference_flops: int = 0
    """Training FLOPs of the reference model, spent once before the first step."""


class Selector(Protocol):
    super_batch_factor: int
    """How many source batches make one super-batch (1 for uniform)."""
    cost: SelectorCost
    """What selection has cost this island so far."""

    def select(self, super_batch: Batch, learner: nn.Module) -> Batch:
        """The batch to train on, chosen from `super_batch`."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue selecting the same way (saved per island)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True, kw_only=True)
class SelectorSetup:
    """What the selectors of a process's hosted islands are built from."""

    data: DataConfig
    model: ModelConfig
    ranks: Sequence[int]
    device: torch.device
    bf16: bool
    seed: int
