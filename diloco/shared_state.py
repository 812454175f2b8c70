"""The group's shared state, its hash, and the protocol of the outer step that advances it.

A leaf module: `outer/` (which takes outer steps on islands) and `transports/` (whose
coordinator and peers keep and serve the state) both import it, and it imports neither.

The shared state after `round` completed rounds is the anchor (the shared parameters, one flat
fp32 vector) and the outer optimizer's state: named tensors that are either per element (as
many elements as the anchor, so a shard or a fragment of the state is a slice of each) or
scalars (an Adam step count). Every island holds the same bits of all of it after every round.
DiLoCo, Douillard et al. 2023, Algorithm 1: https://arxiv.org/abs/2311.08105
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SharedState:
    """The group's shared state after `round` completed rounds: what a newcomer downloads."""

    round: int
    anchor: torch.Tensor
    """The shared parameters, flat fp32."""
    outer_state: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """The outer optimizer's state by name (SGD: `momentum`; Adam: `exp_avg`, `exp_avg_sq`,
    `step`); per-element entries have the anchor's numel, others are scalars."""

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor of the state in a fixed order: the anchor first, then by name."""
        return [("anchor", self.anchor)] + sorted(self.outer_state.items())

    def copy(self) -> SharedState:
        """A deep copy on the CPU (what a coordinator or peer keeps of an island's state)."""
        return SharedState(
            self.round,
            self.anchor.detach().to(torch.float32).cpu().clone(),
            {name: t.detach().cpu().clone() for name, t in self.outer_state.items()},
        )


class OuterOptimizer(Protocol):
    """The rule of the outer step, without state of its own.

    One object is built by the composition root from `outer.optimizer` and injected into every
    place that applies the outer step (each island's `OuterSync`, the grpc coordinator's state
    keeper, a hivemind island serving its state): the state lives in `SharedState.outer_state`,
    so the same rule advances any copy of it, and every copy stays bit-identical.
    """

    name: str

    def init_state(self, anchor_N: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state before the first round (may be empty: created by the first step)."""
        ...

    def step_(
        self,
        anchor_N: torch.Tensor,
        mean_pseudo_grad_N: torch.Tensor,
        state: dict[str, torch.Tensor],
        round: int,
    ) -> None:
        """Apply the outer step of `round` (0-based) to `anchor_N` and `state`, in place."""
        ...


def params_sha256(flat_N: torch.Tensor) -> str:
    """sha256 of the fp32 bytes of a flat parameter vector."""
    fp32_N = flat_N.detach().to(torch.float32).contiguous().cpu()
    # A view of the tensor's bytes: hashing a large model makes no copy of it.
    return hashlib.sha256(fp32_N.numpy().data.cast("B")).hexdigest()


def state_numel_ok(state: Mapping[str, torch.Tensor], numel: int) -> bool:
    """Whether every entry of an outer state is per element (`numel`) or a scalar."""
    return all(t.numel() in (numel, 1) for t in state.values())
