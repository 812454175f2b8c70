"""The selector protocol: which examples of a super-batch the inner loop trains on.

Selection is local to each island and never crosses the network. `uniform` keeps everything;
JEST-style selectors (issue #6) score a larger super-batch with the learner and a reference.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from diloco.data.base import Batch


class Selector(Protocol):
    super_batch_factor: int
    """How many source batches make one super-batch (1 for uniform)."""

    def select(self, super_batch: Batch, learner: nn.Module) -> Batch:
        """The batch to train on, chosen from `super_batch`."""
        ...
