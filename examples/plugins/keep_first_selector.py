"""A selector plug-in: of a super-batch of two source batches, train on the first half
(docs/plugins.md, "A selector")."""

from __future__ import annotations

from typing import Any

from torch import nn

from diloco.data.base import Batch
from diloco.data.selectors.base import SelectorCost


class KeepFirstHalf:
    super_batch_factor = 2  # the runtime concatenates two source batches along dim 0

    def __init__(self) -> None:
        self.cost = SelectorCost()
        self.steps = 0

    def select(self, super_batch: Batch, learner: nn.Module) -> Batch:
        self.steps += 1
        rows = super_batch.inputs.shape[0] // 2
        noisy = None if super_batch.noisy is None else super_batch.noisy[:rows]
        return Batch(super_batch.inputs[:rows], super_batch.num_tokens // 2, noisy)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
