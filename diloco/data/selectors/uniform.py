"""The uniform selector: train on every example of the stream, in order (the default)."""

from __future__ import annotations

from torch import nn

from diloco.data.base import Batch


class UniformSelector:
    super_batch_factor = 1

    def select(self, super_batch: Batch, learner: nn.Module) -> Batch:
        return super_batch
