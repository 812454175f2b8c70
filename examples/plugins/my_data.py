"""A data plug-in: `data.name: my_data:build` (docs/plugins.md, "A data source")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diloco.data import Batch


class Linear:
    """y = x @ w: the same w on every island, a different stream of x per island."""

    def __init__(self, *, island: int, seed: int, batch_size: int, dim: int):
        self.batch_size, self.dim = batch_size, dim
        self.w = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
        self.generator = torch.Generator().manual_seed(seed * 1_000 + island + 1)

    def next_batch(self) -> Batch:
        return self._batch(self.generator)

    def val_batches(self, count: int) -> Sequence[Batch]:
        fixed = torch.Generator().manual_seed(0)  # the same batches on every island and call
        return [self._batch(fixed) for _ in range(count)]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def _batch(self, generator: torch.Generator) -> Batch:
        x = torch.randn(self.batch_size, self.dim, generator=generator)
        return Batch(inputs={"x": x, "y": x @ self.w}, num_tokens=self.batch_size)


def build(
    *, island: int, num_islands: int, seed: int, batch_size: int, seq_len: int, dim: int = 16
) -> Linear:
    return Linear(island=island, seed=seed, batch_size=batch_size, dim=dim)
