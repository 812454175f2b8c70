"""The transport protocol: who averages pseudo-gradients with whom.

A transport moves payloads (uint8 tensors made by a codec) and returns the weighted mean as an
fp32 tensor. It knows bytes and peers, never models. Each transport decides how it reduces;
whatever it does, the mean is summed in fp32 and is bit-identical on every island.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AverageResult:
    """The outcome of one round's average, as seen by one island."""

    mean: torch.Tensor
    """Weighted mean of the decoded pseudo-gradients, fp32, on the payload's device."""
    participants: int
    """Islands whose payloads are in the mean."""
    bytes_sent: int
    """Payload bytes this island put on the wire for this average."""
    bytes_received: int
    """Payload bytes this island took off the wire for this average."""


class Transport(Protocol):
    """One island's handle on the group."""

    rank: int
    num_islands: int

    def join(self, available_rounds: Sequence[int]) -> int | None:
        """Agree with the group on the round to resume from.

        Args:
            available_rounds: rounds this island holds a checkpoint of.

        Returns:
            The round every island resumes from, or None to start from scratch.
        """
        ...

    def average(self, payload: torch.Tensor, weight: float, round: int) -> AverageResult:
        """Weighted mean of every island's payload for `round` (weight: tokens this round)."""
        ...

    def close(self) -> None:
        """Leave the group; safe to call twice."""
        ...


def ring_allreduce_bytes(payload_bytes: int, num_islands: int) -> int:
    """Bytes one island sends (and receives) in a ring all-reduce of a payload.

    Reduce-scatter then all-gather: 2 (N - 1) / N of the payload each way. This is also what
    DDP moves per step for its fp32 gradients, which makes the two directly comparable.
    """
    return 2 * (num_islands - 1) * payload_bytes // num_islands
