"""The `island` section: how many processes one island is, and how they split its inner loop.

An island is a torchrun group of `island.ranks` processes; `island.parallel` says how they share
the inner loop: DDP replicates the parameters and all-reduces the gradients every inner step,
FSDP2 shards parameters, gradients and AdamW state over the ranks (`fully_shard`,
https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html). Issue 13.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from diloco.errors import ConfigError, require


class Parallelism(enum.Enum):
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


@dataclass(kw_only=True)
class IslandSection:
    parallel: Parallelism = Parallelism.none
    """How the island's ranks share its inner loop: none (one rank per island, as before), ddp
    (parameters replicated on every rank, gradients all-reduced inside the island every inner
    step) or fsdp (FSDP2 `fully_shard` over the island's ranks: each rank holds 1/island.ranks
    of the parameters, gradients and AdamW state). Every island of a group must use the same."""
    ranks: int = 0
    """Processes per island (0: derived from torchrun's WORLD_SIZE: WORLD_SIZE /
    transport.islands for the torch transport, WORLD_SIZE for grpc and hivemind). If set, it
    must match what was launched. data.batch_size is per rank and per micro-batch: an island
    trains on data.batch_size x island.ranks x inner.grad_accum sequences per inner step."""

    def __post_init__(self) -> None:
        require(self.ranks >= 0, "island.ranks", ">= 0", self.ranks)
        if self.parallel is Parallelism.none and self.ranks > 1:
            raise ConfigError(
                f"island.parallel must be ddp or fsdp with island.ranks={self.ranks}, got none"
            )
