"""Random windows of a token array: the data source of the built-in and file datasets.

Each island trains on its own contiguous shard (1/N of the training tokens) and draws windows
of seq_len + 1 tokens at random positions from it with its own seeded generator, whose state
is the stream's position in a checkpoint. Validation windows are evenly spaced over the val
split, identical on every island.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diloco.data.base import Batch


class TokenWindows:
    """One island's `DataSource` over a token array.

    Args:
        train: every training token (the island takes its shard).
        val: the validation tokens.
        batch_size: windows per batch.
        seq_len: tokens each window trains on (a window holds seq_len + 1).
        island: this island's index; num_islands: how many share the training tokens.
        seed: the run's seed (each island's generator mixes in its index).
        vocab_size: token ids must be below it.
    """

    def __init__(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        island: int,
        num_islands: int,
        seed: int,
        vocab_size: int,
    ):
        begin, end = len(train) * island // num_islands, len(train) * (island + 1) // num_islands
        self.shard = train[begin:end]
        self.val = val
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        if len(self.shard) < seq_len + 1:
            raise ValueError(
                f"island {island}'s shard has {len(self.shard)} tokens, fewer than one window "
                f"of data.seq_len + 1 = {seq_len + 1}; use more data or fewer islands"
            )
        if len(val) < seq_len + 1:
            raise ValueError(
                f"the validation split has {len(val)} tokens, fewer than one window of "
                f"{seq_len + 1}; raise data.val_fraction or give data.val_path"
            )
        self.generator = torch.Generator().manual_seed(seed * 65_537 + island)
        self.batches_drawn = 0
        self._offsets = np.arange(seq_len + 1)

    def next_batch(self) -> Batch:
        high = len(self.shard) - self.seq_len - 1
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=self.generator)
        self.batches_drawn += 1
        return Batch(self._windows(self.shard, starts.numpy()), self.batch_size * self.seq_len)

    def val_batches(self, count: int) -> Sequence[Batch]:
        high = len(self.val) - self.seq_len - 1
        starts = np.linspace(0, high, count * self.batch_size).astype(np.int64)
        return [
            Batch(self._windows(self.val, chunk), len(chunk) * self.seq_len)
            for chunk in np.split(starts, count)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> torch.Tensor:
        tokens_BT1 = torch.from_numpy(
            np.asarray(tokens[starts[:, None] + self._offsets]).astype(np.int64)
        )
        if int(tokens_BT1.max()) >= self.vocab_size:
            raise ValueError(
                f"token id {int(tokens_BT1.max())} is outside model.vocab_size={self.vocab_size}"
            )
        return tokens_BT1
