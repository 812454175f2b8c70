"""The outer synchronisation of one island: pseudo-gradient, average, Nesterov step.

`OuterSync` owns the shared state of a run (the anchor: the shared parameters at the start of
the round, and the outer optimizer's state) and hooks into any training loop: call
`after_inner_step` after each optimizer step, or `sync` yourself every H steps.

Data path of a round (docs/architecture.md): delta = anchor - local -> (+ residual, with error
feedback) -> codec.encode -> transport.average (weighted by tokens) -> the outer optimizer's
step on the anchor (Nesterov SGD by default) -> local = anchor.
DiLoCo, Douillard et al. 2023, Algorithm 1: https://arxiv.org/abs/2311.08105
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diloco.codecs.base import Codec, all_finite
from diloco.codecs.floating import NoneCodec, none_payload_to_fill
from diloco.errors import TrainingDiverged
from diloco.offload import OffloadedState, check_sliceable
from diloco.os_memory import TRIM_FROM_BYTES, trim_heaps
from diloco.outer.error_feedback import compensate, new_residual
from diloco.outer.shards import ParamShard, WholeParams
from diloco.shared_state import OuterOptimizer, SharedState, params_sha256
from diloco.transports.base import (
    DecodesMeanInto,
    SharedStateSource,
    Transport,
    average_checked,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OuterHyperparams:
    """How an island syncs (the outer step's own settings belong to its `OuterOptimizer`)."""

    inner_steps: int = 50
    """H: inner steps between two syncs."""
    error_feedback: bool = False
    error_feedback_decay: float = 1.0
    """Keep what the codec lost and add it to the next round's pseudo-gradient."""


@dataclass(frozen=True)
class SyncResult:
    """What one outer round did, as seen by this island."""

    round: int
    """Index of the round just completed (0-based)."""
    participants: int
    bytes_sent: int
    bytes_received: int
    sync_s: float
    adopted: bool = False
    """The island took the group's shared state instead of a mean (see AverageResult.adopt)."""
    params_sha256: str = ""
    """The hash of the shared parameters after the round: equal on every island."""


class OuterSync:
    """Every H inner steps: average the islands' pseudo-gradients and take the outer step.

    Args:
        params: the model's parameters, updated in place after each round; or, on an island of
            several ranks, this rank's `ParamShard` (`diloco/outer/shards.py`).
        transport: this island's handle on the group.
        codec: how this island's pseudo-gradient is written on the wire.
        optimizer: the outer step (`diloco.outer.optimizers`; the same object every island of
            the process, and the coordinator's state keeper, use).
        hyper: H and error feedback.
        offload_dir: keep the outer optimizer's state in files in this folder between outer
            steps (`outer.offload_state`, diloco/offload.py); None: in memory.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | ParamShard,
        transport: Transport,
        codec: Codec,
        optimizer: OuterOptimizer,
        hyper: OuterHyperparams,
        offload_dir: Path | None = None,
    ):
        self.shard = params if isinstance(params, ParamShard) else WholeParams(list(params))
        self.transport = transport
        self.codec = codec
        self.optimizer = optimizer
        self.hyper = hyper
        self.anchor_N = self.shard.read()
        # The outer optimizer's state (SGD: the momentum buffer), shared by the group.
        self.outer_state: dict[str, torch.Tensor] = optimizer.init_state(self.anchor_N)
        self.offloaded: OffloadedState | None = None
        if offload_dir is not None:
            check_sliceable(optimizer)
            if self.anchor_N.device.type != "cpu":
                raise ValueError("the outer state can be kept on disk by islands on the CPU only")
            self.offloaded = OffloadedState(offload_dir, self.outer_state, self.numel)
        # This island's own error-feedback residual (never shared); None without error feedback.
        self.residual_N = torch.zeros_like(self.anchor_N) if hyper.error_feedback else None
        if hyper.error_feedback and codec.name == "none":
            log.warning("error feedback has no effect with codec none: it loses nothing")
        self.round = 0
        self._steps_this_round = 0
        self._tokens_this_round = 0.0
        self._anchor_sha256: str | None = None  # cached: the anchor changes once per round

    @property
    def numel(self) -> int:
        return self.anchor_N.numel()

    def after_inner_step(self, tokens: float) -> SyncResult | None:
        """Count one inner step of `tokens` tokens; sync when it was the H-th of the round."""
        self._steps_this_round += 1
        self._tokens_this_round += tokens
        if self._steps_this_round < self.hyper.inner_steps:
            return None
        return self.sync(self._tokens_this_round)

    def sync(self, tokens: float) -> SyncResult:
        """Average this round's pseudo-gradient with the group and apply the outer step.

        Args:
            tokens: tokens this island trained on this round: its weight in the average.

        Raises:
            TrainingDiverged: this island's parameters, or the shared ones after the step, are
                not finite (nothing is sent, and the caller writes no checkpoint of them).
        """
        start = time.perf_counter()
        # The inner loop's freed gradients may still be resident in malloc's heaps: given
        # back before the sync allocates its payload (diloco/os_memory.py).
        if 4 * self.numel >= TRIM_FROM_BYTES:
            trim_heaps()
        if self.offloaded is not None:
            self.offloaded.release()  # read since the last round (a checkpoint, a download)
        payload, delta_N = self._pseudo_gradient()
        if not all_finite(delta_N):
            raise TrainingDiverged(
                f"round {self.round}: this island's parameters are not finite after its inner "
                "steps (the training diverged): lower inner.lr or outer.lr"
            )
        spare_N = None
        if payload is None:
            payload = self._encode(delta_N)
            if isinstance(self.transport, DecodesMeanInto):
                spare_N = delta_N  # spent: the transport decodes the mean into its buffer
        # The pseudo-gradient is in the payload now: its buffer is freed before the mean
        # arrives, or holds the mean, so a sync holds one model-sized buffer besides the
        # training state and the payload (issue 14).
        del delta_N
        # Only transports that keep the group's state check the hash: no hashing otherwise.
        sha = self.params_sha256() if isinstance(self.transport, SharedStateSource) else None
        # checked: the pseudo-gradient is finite (above)
        result = average_checked(self.transport, payload, tokens, self.round, sha, spare_N)
        done_round = self.round
        if result.adopt is not None:
            log.warning(
                "the group moved on without this island (its round %d): adopting the group's "
                "shared state after round %d",
                self.round,
                result.adopt.round,
            )
            self.adopt(result.adopt)
        else:
            if self.offloaded is not None:
                self.offloaded.step_in_slices(
                    self.optimizer, self.anchor_N, result.mean, self.round
                )
            else:
                self.optimizer.step_(self.anchor_N, result.mean, self.outer_state, self.round)
            if not all_finite(self.anchor_N):
                raise TrainingDiverged(
                    f"round {self.round}: the shared parameters are not finite after the outer "
                    "step (the training diverged): lower outer.lr"
                )
            self.shard.write_(self.anchor_N)
            self._anchor_sha256 = None
            self.round += 1
            self._steps_this_round = 0
            self._tokens_this_round = 0.0
        return SyncResult(
            done_round,
            result.participants,
            result.bytes_sent,
            result.bytes_received,
            time.perf_counter() - start,
            adopted=result.adopt is not None,
            params_sha256=self.shard.island_sha256(self.params_sha256()),
        )

    def _pseudo_gradient(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(payload, pseudo-gradient). With codec none and no residual the pseudo-gradient is
        written straight into its payload's body, since encoding it would be a copy: the sync
        never holds both (one model-sized buffer less, issue 14). Otherwise (None, a new
        vector) for `_encode`."""
        if self.residual_N is None and isinstance(self.codec, NoneCodec):
            payload, body_N = none_payload_to_fill(self.numel, self.anchor_N.device)
            return payload, self.shard.pseudo_gradient(self.anchor_N, out_N=body_N)
        return None, self.shard.pseudo_gradient(self.anchor_N)

    def _encode(self, delta_N: torch.Tensor) -> torch.Tensor:
        """The payload of `delta_N`, with this island's residual added and renewed when it
        keeps one (error feedback)."""
        if self.residual_N is None:
            return self.codec.encode(delta_N)
        target_N = compensate(delta_N, self.residual_N, self.hyper.error_feedback_decay)
        payload = self.codec.encode(target_N)
        self.residual_N = new_residual(target_N, self.codec.decode(payload, self.numel))
        return payload

    def params_sha256(self) -> str:
        """sha256 of this rank's shard of the shared parameters (of all of them on a one-rank
        island): equal on every island after every round."""
        if self._anchor_sha256 is None:
            self._anchor_sha256 = params_sha256(self.anchor_N)
        return self._anchor_sha256

    def shared_state(self) -> SharedState:
        """The shared state this island holds (what a transport hands a newcomer)."""
        return SharedState(self.round, self.anchor_N, self.outer_state)

    def release_offloaded_state(self) -> None:
        """With the outer state in files (outer.offload_state): drop from memory what a reader
        of `shared_state()` brought in (a transport seeding the group with it); the sync and
        `state_dict` drop their own reads. No-op otherwise."""
        if self.offloaded is not None:
            self.offloaded.release()

    def adopt(self, state: SharedState) -> None:
        """Replace the shared state with the group's; the local replica restarts from it.

        The inner optimizer state and the error-feedback residual are this island's own and
        are kept: they stay meaningful for parameters close to the new anchor.
        """
        if state.anchor.numel() != self.numel:
            raise ValueError(
                f"the group's shared state holds {state.anchor.numel()} elements, "
                f"this model has {self.numel}"
            )
        self.anchor_N.copy_(state.anchor)
        self._load_outer_state(state.outer_state)
        self.round = int(state.round)
        self._steps_this_round = 0
        self._tokens_this_round = 0.0
        self._anchor_sha256 = None
        self.shard.write_(self.anchor_N)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "anchor": self.anchor_N.cpu(),
            "outer_state": {name: t.cpu() for name, t in self.outer_state.items()}
            if self.offloaded is None
            else self.offloaded.copies(),
            "round": self.round,
        }
        if self.residual_N is not None:
            state["residual"] = self.residual_N.cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        anchor = state["anchor"]
        if anchor.shape != self.anchor_N.shape:
            raise ValueError(
                f"checkpoint holds {anchor.numel()} shared elements, the model has {self.numel}"
            )
        self.anchor_N.copy_(anchor)
        self._load_outer_state(state["outer_state"])
        self.load_residual(state.get("residual"))
        self.round = int(state["round"])
        self._steps_this_round = 0
        self._tokens_this_round = 0.0
        self._anchor_sha256 = None
        self.shard.write_(self.anchor_N)

    def _load_outer_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the group's outer optimizer state, in this dict (transports may hold it)."""
        for name, value in state.items():
            if value.numel() not in (self.numel, 1):
                raise ValueError(
                    f"the outer optimizer state {name!r} holds {value.numel()} elements, "
                    f"the model has {self.numel}"
                )
        if self.offloaded is not None:
            self.offloaded.load(state)
            return
        device = self.anchor_N.device
        loaded = {name: value.to(device).clone() for name, value in state.items()}
        self.outer_state.clear()
        self.outer_state.update(loaded)

    def load_residual(self, residual: torch.Tensor | None) -> None:
        """Restore this island's error-feedback residual; None (a checkpoint written without
        error feedback): start from zeros."""
        if self.residual_N is None:
            if residual is not None:
                log.warning("the checkpoint holds an error-feedback residual; it is dropped")
            return
        if residual is None:
            self.residual_N.zero_()
            return
        if residual.shape != self.residual_N.shape:
            raise ValueError(
                f"checkpoint residual holds {residual.numel()} elements, the model has {self.numel}"
            )
        self.residual_N.copy_(residual)
