"""The uniform selector: train on every example of the stream, in order (the default)."""

from __future__ import annotations

from typing import Any

from torch import nn

from diloco.data.base import Batch
from diloco.data.selectors.base import SelectorCost


class UniformSelector:
    super_batch_factor = 1

    def __init__(self) -> None:
        self.cost = SelectorCost()  # selecting nothing costs nothing

    def select(self, super_batch: Batch, learner: nn.Module) -> Batch:
        return super_batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
