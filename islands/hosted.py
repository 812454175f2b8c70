"""One island's pieces inside this process: its replica, inner trainer, data and outer sync.

A process hosts one island (torch transport: one process per island) or several (local
transport: the islands run their inner loops in turn on one device, then average together).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from diloco.data.base import Batch, DataSource
from diloco.data.selectors.base import Selector
from diloco.inner.trainer import InnerTrainer
from diloco.outer.shards import combine_shard_hashes
from diloco.outer.streaming import StreamingSync
from diloco.outer.sync import OuterSync, SyncResult
from diloco.parallel.batches import rank_micro_batches
from diloco.transports.base import Transport

T = TypeVar("T")


@dataclass
class RoundWork:
    """What one island's inner phase did this round (and its cumulative counters after it)."""

    loss_sum: torch.Tensor
    steps: int
    tokens: int
    inner_step: int
    """Inner steps this island has taken in the whole run."""
    inner_lr: float
    """The learning rate of the round's last inner step."""
    selection: dict[str, Any]
    """What data selection cost and kept so far (metrics fields, docs/output.md)."""


@dataclass(frozen=True)
class BatchSplit:
    """This rank's part of each island batch (diloco/parallel/batches.py), and the island's
    mean of the ranks' losses."""

    island_rank: int = 0
    ranks: int = 1
    grad_accum: int = 1
    group: Any = None
    """The island's process group (None with one rank)."""

    def micro_batches(self, inputs: Any) -> list[Any]:
        if self.ranks == 1 and self.grad_accum == 1:
            return [inputs]
        return rank_micro_batches(
            inputs, island_rank=self.island_rank, ranks=self.ranks, grad_accum=self.grad_accum
        )

    def island_mean(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The mean over the island's ranks (each trained on its own rows): the island's loss."""
        if self.group is None:
            return loss_sum
        total = loss_sum.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total / self.ranks


@dataclass
class HostedIsland:
    rank: int
    model: nn.Module
    trainer: InnerTrainer
    data: DataSource
    selector: Selector
    outer: OuterSync | None
    """The blocking outer sync (None when the run streams: `stream`)."""
    stream: StreamingSync | None = None
    """Streaming DiLoCo's outer loop (outer.fragments > 1 or outer.overlap_steps > 0)."""
    tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    flops_per_token: int = 0
    """Training FLOPs per token of the model (metrics: learner_flops)."""
    examples_labelled: int = 0
    """Trained-on examples whose noise flag the data source gave (data.noise), cumulative."""
    noisy_examples: int = 0
    """Of those, how many were junk, cumulative (metrics: selected_noisy_fraction)."""
    split: BatchSplit = field(default_factory=lambda: BatchSplit())
    """How an island batch splits over this island's ranks and micro-batches."""

    def run_inner(self, steps: int, on_step: Callable[[], None] | None = None) -> RoundWork:
        """`steps` AdamW steps on this island's own stream."""
        loss_sum = torch.zeros((), device=self.trainer.device)
        tokens = 0
        for _ in range(steps):
            batch = self._next_batch()
            if batch.noisy is not None:
                self.examples_labelled += int(batch.noisy.numel())
                self.noisy_examples += int(batch.noisy.sum())
            loss_sum += self.trainer.train_step(*self.split.micro_batches(batch.inputs))
            tokens += batch.num_tokens  # the island's: every rank draws the whole island batch
            if on_step is not None:
                on_step()
        self.tokens += tokens
        loss_sum = self.split.island_mean(loss_sum)
        step_count = self.trainer.step_count
        return RoundWork(
            loss_sum,
            steps,
            tokens,
            inner_step=step_count,
            inner_lr=self.trainer.lr_at(max(0, step_count - 1)),
            selection=self.selection_fields(),
        )

    def selection_fields(self) -> dict[str, Any]:
        """What data selection cost and kept on this island, cumulative (docs/output.md)."""
        cost = self.selector.cost
        labelled = self.examples_labelled
        return {
            "learner_flops": self.tokens * self.flops_per_token,
            "scoring_flops": cost.scoring_flops,
            "scoring_s": round(cost.scoring_s, 6),
            "reference_flops": cost.reference_flops,
            "selected_noisy_fraction": (
                round(self.noisy_examples / labelled, 6) if labelled else None
            ),
        }

    @property
    def blocking(self) -> OuterSync:
        assert self.outer is not None, "a streaming island has no blocking sync"
        return self.outer

    @property
    def round(self) -> int:
        """Outer rounds this island has completed."""
        return self.stream.round if self.stream is not None else self.blocking.round

    def shared_sha256(self) -> str:
        """The hash of the shared parameters this island holds."""
        # An island of several ranks combines its ranks' shard hashes (a collective).
        if self.stream is not None:
            return combine_shard_hashes(self.stream.params_sha256(), self.split.group)
        return self.blocking.shard.island_sha256(self.blocking.params_sha256())

    def shared_flat(self) -> torch.Tensor:
        """The shared parameters as one flat vector in parameter order."""
        if self.stream is not None:
            return self.stream.shared_flat()
        return self.blocking.anchor_N.cpu()

    def transports(self) -> list[Transport]:
        """This island's transports: one, or one per fragment when it streams."""
        if self.stream is not None:
            return [fragment.transport for fragment in self.stream.fragments]
        return [self.blocking.transport]

    def sync(self, tokens: int) -> SyncResult:
        result = self.blocking.sync(tokens)
        self.bytes_sent += result.bytes_sent
        self.bytes_received += result.bytes_received
        return result

    def state_dict(self) -> dict[str, Any]:
        state = {
            "trainer": self.trainer.state_dict(),
            "data": self.data.state_dict(),
            "tokens": self.tokens,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "selector": self.selector.state_dict(),
            "noise_counts": (self.examples_labelled, self.noisy_examples),
        }
        # The error-feedback residual is this island's own, unlike the shared outer state
        # that the checkpoint keeps once for all hosted islands.
        if self.outer is not None and self.outer.residual_N is not None:
            state["residual"] = self.outer.residual_N.cpu()
        if self.stream is not None:
            state["stream"] = self.stream.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.data.load_state_dict(state["data"])
        if self.outer is not None:
            self.outer.load_residual(state.get("residual"))
        if self.stream is not None:
            self.stream.load_state_dict(state["stream"])
        self.tokens = int(state["tokens"])
        self.bytes_sent = int(state["bytes_sent"])
        self.bytes_received = int(state["bytes_received"])
        self.selector.load_state_dict(state.get("selector", {}))
        self.examples_labelled, self.noisy_examples = state.get("noise_counts", (0, 0))

    def _next_batch(self) -> Batch:
        factor = self.selector.super_batch_factor
        if factor == 1:
            return self.selector.select(self.data.next_batch(), self.model)
        parts = [self.data.next_batch() for _ in range(factor)]
        flags = [part.noisy for part in parts]
        super_batch = Batch(
            torch.cat([part.inputs for part in parts]),
            sum(p.num_tokens for p in parts),
            None if any(f is None for f in flags) else torch.cat(flags),
        )
        return self.selector.select(super_batch, self.model)


def sync_all(
    hosted: list[HostedIsland], works: list[RoundWork], abort: Callable[[], None]
) -> list[SyncResult]:
    """Every hosted island's sync, concurrently: each blocks until the group has averaged.

    `abort` releases the others when one fails, so a failure never leaves them waiting.
    """
    calls = [partial(island.sync, work.tokens) for island, work in zip(hosted, works, strict=True)]
    return _concurrently(calls, abort)


def join_all(
    hosted: list[HostedIsland],
    available_rounds: list[int],
    fingerprint: Mapping[str, str],
    abort: Callable[[], None],
) -> int | None:
    """Every hosted island's join, concurrently: a collective, like the average."""
    answers: list[int | None] = []
    for lane in range(len(hosted[0].transports())):  # every lane is its own group
        calls = [
            partial(island.transports()[lane].join, available_rounds, fingerprint)
            for island in hosted
        ]
        answers += _concurrently(calls, abort)
    assert len(set(answers)) == 1, f"hosted islands joined at different rounds: {answers}"
    return answers[0]


def _concurrently(calls: Sequence[Callable[[], T]], abort: Callable[[], None]) -> list[T]:
    if len(calls) == 1:
        return [calls[0]()]
    results: list[Any] = [None] * len(calls)  # None may be a call's answer (join)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as error:  # re-raised below, in the caller's thread
            errors.append(error)
            abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
