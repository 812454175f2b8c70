"""What the inner loop reads: batches from a data source that belongs to one island."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Batch:
    """One training or validation batch."""

    inputs: Any
    """What the model's forward takes (for the GPT: int64 tokens of shape [B, T + 1])."""
    num_tokens: int
    """Tokens (or examples) it trains on: the island's weight in the average counts these."""
    noisy: Any = None
    """Which examples are junk (a bool tensor over dim 0) when the source knows it
    (`data.noise`), else None; only the metrics read it."""


class DataSource(Protocol):
    """One island's stream of training batches, and the shared validation batches.

    Each island owns a different shard or stream; the validation batches are the same on
    every island so that every island measures the same thing.
    """

    def next_batch(self) -> Batch:
        """The next training batch of this island's stream."""
        ...

    def val_batches(self, count: int) -> Sequence[Batch]:
        """`count` validation batches, identical on every call and on every island."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The stream's position, enough to continue exactly where it was."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
