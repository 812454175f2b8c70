"""What the coordinator hands back: an island's answer, and the coordinator's counters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diloco.shared_state import SharedState


@dataclass(frozen=True)
class RoundAnswer:
    """What an island gets back for its payload."""

    round: int
    participants: int
    params_sha256: str
    """The hash of the shared parameters after the round, or "" in the first answers of a
    round (it is computed after they go out; each island hashes its own)."""
    mean_payload: torch.Tensor | None
    """The re-encoded mean (uint8), or None when `adopt` is set."""
    adopt: SharedState | None = None
    """The group's state to adopt: the keeper's own (no copy per caller), to be read with
    `keeper.read_chunks(generation)`, which fails if a round's step changed it meanwhile."""
    generation: int = 0
    late: bool = False


@dataclass
class CoordinatorStats:
    rounds_closed: int = 0
    late_payloads: int = 0
    refused_payloads: int = 0
    dropped_payloads: int = 0
    adopted: int = 0
    participants: list[int] = field(default_factory=list)
