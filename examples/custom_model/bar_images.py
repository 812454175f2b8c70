"""A user's own data: noisy S x S images of one bar, horizontal, vertical or diagonal.

The example makes its data itself, so it needs no download. Each island draws its own stream
(its own seed); the validation batches are the same on every island. The config names the
factory (`data.name: bar_images:build`); `data.args` become its keyword arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diloco.data import Batch

CLASSES = ("horizontal", "vertical", "diagonal", "anti-diagonal")


def bar_images(
    count: int, side: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images [count, 1, side, side] with one bar each at a random place, and labels."""
    labels_B = torch.randint(0, len(CLASSES), (count,), generator=generator)
    offsets_B = torch.randint(-side // 3, side // 3 + 1, (count,), generator=generator)
    rows = torch.arange(side).view(1, side, 1)
    cols = torch.arange(side).view(1, 1, side)
    offset = offsets_B.view(-1, 1, 1)
    centre = side // 2
    shape = (count, side, side)
    masks = torch.stack(
        [
            (rows == centre + offset).expand(shape),  # horizontal
            (cols == centre + offset).expand(shape),  # vertical
            (rows - cols == offset).expand(shape),  # diagonal
            (rows + cols == side - 1 + offset).expand(shape),  # anti-diagonal
        ],
        dim=1,
    )  # [count, 4, side, side]
    bar_BSS = masks[torch.arange(count), labels_B].float()
    images = bar_BSS + noise * torch.randn(count, side, side, generator=generator)
    return images.unsqueeze(1), labels_B


class BarImages:
    """One island's `DataSource` (docs/plugins.md): a seeded stream of generated batches."""

    def __init__(self, *, island: int, seed: int, batch_size: int, side: int, noise: float):
        self.batch_size, self.side, self.noise = batch_size, side, noise
        self.generator = torch.Generator().manual_seed(seed * 1_000 + island + 1)

    def next_batch(self) -> Batch:
        return self._batch(self.generator)

    def val_batches(self, count: int) -> Sequence[Batch]:
        fixed = torch.Generator().manual_seed(12_345)  # identical on every island and call
        return [self._batch(fixed) for _ in range(count)]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def _batch(self, generator: torch.Generator) -> Batch:
        images, labels = bar_images(self.batch_size, self.side, self.noise, generator)
        # num_tokens weighs this island in the average: here it counts images.
        return Batch(inputs={"images": images, "labels": labels}, num_tokens=self.batch_size)


def build(
    *,
    island: int,
    num_islands: int,
    seed: int,
    batch_size: int,
    seq_len: int,
    side: int = 16,
    noise: float = 0.5,
) -> BarImages:
    """Called once per island; `seq_len` is for token data and is not used here."""
    del num_islands, seq_len
    return BarImages(island=island, seed=seed, batch_size=batch_size, side=side, noise=noise)
