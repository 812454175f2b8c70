"""What the coordinator hands back: an island's answer, and the coordinator's counters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from diloco.shared_state import SharedState
from diloco.transports.grpc.state_keeper import StateKeeper

log = logging.getLogger(__name__)


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


def adopt_answer(
    keeper: StateKeeper, participants: int, rank: int, round: int, open_round: int
) -> RoundAnswer:
    """The answer that tells island `rank` (whose payload was for `round`) to adopt the
    group's state: the keeper's own, read from its one copy (`RoundAnswer.adopt`)."""
    state = keeper.state
    assert state is not None
    why = (
        f"its round {round} is not the group's {open_round}"
        if round != open_round
        else "its shared parameters differ from the group's"
    )
    log.warning("island %d is told to adopt the shared state: %s", rank, why)
    return RoundAnswer(
        state.round, participants, keeper.sha, None, adopt=state, generation=keeper.generation
    )
