"""Streaming DiLoCo on one island: fragments synced on a staggered schedule, each exchange
overlapping the next tau inner steps, merged by alpha-mixing; optionally eager.

Streaming DiLoCo, Douillard et al. 2025 (https://arxiv.org/abs/2501.18512): fragment p of the
shared parameters has its own anchor, outer optimizer state and error-feedback residual. After
inner step t (its sync point, `fragments.sync_offset`), the island sends
`delta_p = anchor_p - local_p(t)` and keeps training; at step t + tau the group's mean arrives,
the outer step gives the new shared fragment `g_p = outer(anchor_p, mean)`, and the local one
is merged: `local_p <- alpha * local_p(t + tau) + (1 - alpha) * g_p`; `anchor_p <- g_p`. With
tau = 0 the local fragment simply becomes `g_p` (blocking DiLoCo: P = 1, tau = 0 is today's
round, bit for bit). If the mean is not there at t + tau, the island waits (`blocked_s`).

Eager updates (after Kale et al. 2025, "Eager updates for overlapped communication and
computation in DiLoCo"): at the sync point the island does not wait to use its own fresh
pseudo-gradient. It estimates the group's mean from its fresh delta and the others' deltas of
the fragment's last completed exchange, `m_hat = m_last + (delta_now - delta_last) / n_last`
(exact when the islands' weights are equal), takes the outer step on copies, `g_hat =
outer(anchor_p, m_hat)`, and merges at once: `local_p <- alpha * local_p + (1 - alpha) * g_hat`.
When the true mean arrives it corrects by the estimate's error:
`local_p += (1 - alpha) * (g_p - g_hat)`; `anchor_p <- g_p`. The shared state is the same as
without eager; only the local replica moves earlier.

Exchanges run one at a time, in order, on a worker thread, so every island submits the same
collectives in the same order whatever the transport.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from diloco.codecs.base import Codec, all_finite
from diloco.errors import TrainingDiverged
from diloco.outer.error_feedback import compensate, new_residual
from diloco.outer.fragments import syncs_at
from diloco.outer.pseudo_gradient import copy_flat_into_, flatten_params
from diloco.outer.stream_state import (
    Fragment,
    InFlight,
    fragment_state,
    in_flight_state,
    load_fragment,
)
from diloco.shared_state import OuterOptimizer, SharedState, params_sha256
from diloco.transports.base import (
    AverageResult,
    SharedStateSource,
    Transport,
    average_checked,
)


@dataclass(frozen=True, kw_only=True)
class StreamPlan:
    fragments: int
    inner_steps: int
    overlap_steps: int
    mix: float
    eager: bool = False
    error_feedback: bool = False
    error_feedback_decay: float = 1.0


@dataclass
class StepReport:
    """What the exchanges of one inner step did."""

    blocked_s: float = 0.0
    finished: list[int] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    adopted: bool = False


class StreamingSync:
    """The streaming outer loop of one island (module docstring).

    Args:
        params: the model's parameters, in order.
        assignment: the tensor indices of each fragment (`fragments.assign_fragments`).
        transports: one per fragment (each averages payloads of its fragment's size).
        codec, optimizer: the run's codec and outer optimizer (the one injected object).
        plan: P, H, tau, alpha, eager, error feedback.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        assignment: Sequence[Sequence[int]],
        transports: Sequence[Transport],
        codec: Codec,
        optimizer: OuterOptimizer,
        plan: StreamPlan,
    ):
        self.codec, self.optimizer, self.plan = codec, optimizer, plan
        self.assignment = [list(members) for members in assignment]
        self.fragments = []
        for index, (members, transport) in enumerate(zip(assignment, transports, strict=True)):
            tensors = [params[i] for i in members]
            anchor = flatten_params(tensors)
            residual = torch.zeros_like(anchor) if plan.error_feedback else None
            self.fragments.append(
                Fragment(index, tensors, transport, anchor, optimizer.init_state(anchor), residual)
            )
        self.tokens = 0.0
        self.round = 0
        """Rounds (periods of H inner steps) completed: the runtime counts them."""
        self.step = 0
        """Inner steps completed."""
        self.in_flight: dict[int, InFlight] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outer-sync")

    # -- the inner loop's hook ------------------------------------------------------------------

    def merge_due(self, step: int, report: StepReport) -> None:
        """After inner step `step` (1-based, cumulative): merge the exchanges due now (waiting
        for them if their mean has not arrived)."""
        for index, pending in sorted(self.in_flight.items()):
            if pending.merge_step == step:
                self._finish(index, report)

    def start_due(self, step: int, tokens: float) -> list[int]:
        """Count the step's tokens; start the fragments whose sync point is `step`.

        Islands hosted by one process must all start before any waits for its mean (their
        exchange is one collective): call `start_due` on every island, then `finish_started`.
        """
        self.tokens += tokens
        started = syncs_at(step, self.plan.fragments, self.plan.inner_steps)
        for index in started:
            self._start(index, step)
        return started

    def finish_started(self, started: Sequence[int], report: StepReport) -> None:
        """With tau = 0, the fragments started this step are merged at once (blocking)."""
        if self.plan.overlap_steps == 0:
            for index in started:
                self._finish(index, report)

    def flush(self) -> StepReport:
        """Wait for every exchange in flight and merge it now (the end of the run)."""
        report = StepReport()
        for index in sorted(self.in_flight):
            self._finish(index, report)
        return report

    def wait_in_flight(self) -> float:
        """Wait for the exchanges in flight to complete, without merging them (before a
        checkpoint: their results are saved and merged at their step). Returns the seconds."""
        begin = time.perf_counter()
        for index, pending in sorted(self.in_flight.items()):
            if pending.result is None and pending.future is not None:
                pending.result = pending.future.result()
                pending.future = None
            if pending.result is not None and pending.result.adopt is not None:
                self._finish(index, StepReport())  # the group's state: take it now
        return time.perf_counter() - begin

    # -- one exchange ----------------------------------------------------------------------------

    def _start(self, index: int, step: int) -> None:
        fragment = self.fragments[index]
        delta_N = fragment.anchor_N - flatten_params(fragment.params)
        if not all_finite(delta_N):
            raise TrainingDiverged(
                f"fragment {index}'s parameters are not finite after inner step {step} (the "
                "training diverged): lower inner.lr or outer.lr"
            )
        target_N = delta_N
        if fragment.residual_N is not None:
            target_N = compensate(delta_N, fragment.residual_N, self.plan.error_feedback_decay)
        payload = self.codec.encode(target_N)
        if fragment.residual_N is not None:
            fragment.residual_N = new_residual(
                target_N, self.codec.decode(payload, delta_N.numel())
            )
        weight = self.tokens - fragment.tokens_mark
        fragment.tokens_mark = self.tokens
        sha = (
            params_sha256(fragment.anchor_N)
            if isinstance(fragment.transport, SharedStateSource)
            else None
        )
        future = self._worker.submit(  # checked: delta_N is finite (above)
            average_checked, fragment.transport, payload, weight, fragment.syncs, sha
        )
        pending = InFlight(index, step + self.plan.overlap_steps, delta_N, future)
        if self.plan.eager and fragment.last is not None and self.plan.overlap_steps > 0:
            pending.estimate_N = self._eager_(fragment, delta_N)
        self.in_flight[index] = pending

    def _eager_(self, fragment: Fragment, delta_N: torch.Tensor) -> torch.Tensor:
        assert fragment.last is not None
        mean_last, delta_last, participants = fragment.last
        estimate_mean = mean_last + (delta_N - delta_last) / max(1, participants)
        estimate = fragment.anchor_N.clone()
        state = {name: t.clone() for name, t in fragment.outer_state.items()}
        self.optimizer.step_(estimate, estimate_mean, state, fragment.syncs)
        self._mix_(fragment, estimate)
        return estimate

    def _finish(self, index: int, report: StepReport) -> None:
        pending = self.in_flight.pop(index)
        begin = time.perf_counter()
        result = pending.result
        if result is None:
            assert pending.future is not None
            result = pending.future.result()
        report.blocked_s += time.perf_counter() - begin
        fragment = self.fragments[index]
        fragment.bytes_sent += result.bytes_sent
        fragment.bytes_received += result.bytes_received
        report.finished.append(index)
        report.participants.append(result.participants)
        if result.adopt is not None:
            self._adopt(fragment, result.adopt)
            report.adopted = True
            return
        self.optimizer.step_(fragment.anchor_N, result.mean, fragment.outer_state, fragment.syncs)
        if not all_finite(fragment.anchor_N):
            raise TrainingDiverged(
                f"fragment {index}'s shared parameters are not finite after the outer step "
                "(the training diverged): lower outer.lr"
            )
        fragment.syncs += 1
        fragment.last = (result.mean, pending.delta_N, result.participants)
        if self.plan.overlap_steps == 0:
            copy_flat_into_(fragment.params, fragment.anchor_N)  # blocking: local = shared
        elif pending.estimate_N is not None:
            correction = (fragment.anchor_N - pending.estimate_N) * (1.0 - self.plan.mix)
            self._add_(fragment, correction)
        else:
            self._mix_(fragment, fragment.anchor_N)

    def _mix_(self, fragment: Fragment, shared_N: torch.Tensor) -> None:
        """local <- alpha * local + (1 - alpha) * shared, tensor by tensor, in place."""
        alpha, offset = self.plan.mix, 0
        with torch.no_grad():
            for tensor in fragment.params:
                n = tensor.numel()
                tensor.mul_(alpha).add_(
                    shared_N[offset : offset + n].view_as(tensor), alpha=1 - alpha
                )
                offset += n

    def _add_(self, fragment: Fragment, delta_N: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for tensor in fragment.params:
                n = tensor.numel()
                tensor.add_(delta_N[offset : offset + n].view_as(tensor))
                offset += n

    def _adopt(self, fragment: Fragment, state: SharedState) -> None:
        fragment.anchor_N.copy_(state.anchor)
        fragment.outer_state.clear()
        fragment.outer_state.update({k: v.clone() for k, v in state.outer_state.items()})
        fragment.syncs = int(state.round)
        fragment.last = None
        copy_flat_into_(fragment.params, fragment.anchor_N)

    # -- the shared parameters, checkpoints -------------------------------------------------------

    def params_sha256(self) -> str:
        """The hash of the shared parameters: every fragment's anchor, in fragment order."""
        return params_sha256(torch.cat([f.anchor_N for f in self.fragments]))

    def shared_flat(self) -> torch.Tensor:
        """The shared parameters as one flat vector in the model's parameter order (what a
        blocking run's anchor is: checkpoints, export and warm starts read it)."""
        pieces: dict[int, torch.Tensor] = {}
        for fragment, members in zip(self.fragments, self.assignment, strict=True):
            offset = 0
            for index, tensor in zip(members, fragment.params, strict=True):
                pieces[index] = fragment.anchor_N[offset : offset + tensor.numel()]
                offset += tensor.numel()
        return torch.cat([pieces[index] for index in sorted(pieces)]).cpu()

    @contextmanager
    def shared_params(self) -> Iterator[None]:
        """The model holds the shared parameters (the anchors) inside the block (evaluation)."""
        saved = [flatten_params(f.params) for f in self.fragments]
        for fragment in self.fragments:
            copy_flat_into_(fragment.params, fragment.anchor_N)
        try:
            yield
        finally:
            for fragment, local in zip(self.fragments, saved, strict=True):
                copy_flat_into_(fragment.params, local)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs; exchanges in flight must have completed
        (`wait_in_flight`): their results are saved and merged at their step."""
        assert all(p.future is None for p in self.in_flight.values()), "wait_in_flight first"
        return {
            "tokens": self.tokens,
            "round": self.round,
            "step": self.step,
            "fragments": [fragment_state(f) for f in self.fragments],
            "in_flight": [in_flight_state(p) for p in self.in_flight.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens = float(state["tokens"])
        self.round, self.step = int(state["round"]), int(state["step"])
        for fragment, saved in zip(self.fragments, state["fragments"], strict=True):
            load_fragment(fragment, saved)
        self.in_flight = {}
        for saved in state["in_flight"]:
            result = AverageResult(
                saved["mean"], saved["participants"], saved["bytes_sent"], saved["bytes_received"]
            )
            estimate = saved.get("estimate")
            self.in_flight[int(saved["fragment"])] = InFlight(
                int(saved["fragment"]),
                int(saved["merge_step"]),
                saved["delta"],
                None,
                result,
                estimate,
            )

    def seed_groups(self) -> bool:
        """Give each fragment's exchange group its first state, or take the group's: called
        once when the run starts or resumes, as a blocking island's `shared_state` is.

        A transport that keeps a shared state per lane (grpc: one coordinator lane per
        fragment) holds none until an island seeds it. A fragment whose exchange was in
        flight at the checkpoint expects the group one round ahead (that exchange closed it;
        its saved result is merged at its step); a group anywhere else wins, as it does for a
        blocking island, and the stale exchange is dropped. Returns whether any fragment
        adopted the group's state.
        """
        adopted = False
        for fragment in self.fragments:
            transport = fragment.transport
            if not isinstance(transport, SharedStateSource):
                continue
            local = SharedState(fragment.syncs, fragment.anchor_N, fragment.outer_state)
            group = transport.shared_state(local)
            pending = fragment.index in self.in_flight
            if group is None or (pending and group.round == fragment.syncs + 1):
                continue
            self.in_flight.pop(fragment.index, None)
            self._adopt(fragment, group)
            adopted = True
        return adopted

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
