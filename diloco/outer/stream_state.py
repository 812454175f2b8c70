"""One Streaming DiLoCo fragment's state on an island, and its checkpoint form.

A fragment (diloco/outer/streaming.py) has its own anchor, outer optimizer state, error-feedback
residual and exchange in flight; a checkpoint saves them with the fragment's replica so that a
killed streaming run resumes bit-exactly.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from diloco.outer.pseudo_gradient import copy_flat_into_, flatten_params
from diloco.transports.base import AverageResult, Transport


@dataclass
class Fragment:
    """One fragment's part of the shared state on this island."""

    index: int
    params: list[torch.Tensor]
    transport: Transport
    anchor_N: torch.Tensor
    outer_state: dict[str, torch.Tensor]
    residual_N: torch.Tensor | None
    syncs: int = 0
    """Exchanges completed: the transport's round of the next one."""
    tokens_mark: float = 0.0
    """The island's cumulative tokens at this fragment's last sync point."""
    bytes_sent: int = 0
    bytes_received: int = 0
    last: tuple[torch.Tensor, torch.Tensor, int] | None = None
    """(mean, this island's delta, participants) of the last exchange: what eager reuses."""


@dataclass
class InFlight:
    fragment: int
    merge_step: int
    delta_N: torch.Tensor
    future: Future[AverageResult] | None = None
    result: AverageResult | None = None
    estimate_N: torch.Tensor | None = None
    """Eager: the shared fragment estimated at the sync point."""


def fragment_state(fragment: Fragment) -> dict[str, Any]:
    state: dict[str, Any] = {
        "anchor": fragment.anchor_N.cpu(),
        "outer_state": {k: v.cpu() for k, v in fragment.outer_state.items()},
        "syncs": fragment.syncs,
        "tokens_mark": fragment.tokens_mark,
        "bytes": [fragment.bytes_sent, fragment.bytes_received],
        "params": flatten_params(fragment.params).cpu(),
    }
    if fragment.residual_N is not None:
        state["residual"] = fragment.residual_N.cpu()
    if fragment.last is not None:
        mean, delta, participants = fragment.last
        state["last"] = {"mean": mean.cpu(), "delta": delta.cpu(), "participants": participants}
    return state


def load_fragment(fragment: Fragment, saved: dict[str, Any]) -> None:
    device = fragment.anchor_N.device
    fragment.anchor_N.copy_(saved["anchor"])
    fragment.outer_state.clear()
    fragment.outer_state.update({k: v.to(device).clone() for k, v in saved["outer_state"].items()})
    fragment.syncs = int(saved["syncs"])
    fragment.tokens_mark = float(saved["tokens_mark"])
    fragment.bytes_sent, fragment.bytes_received = (int(b) for b in saved["bytes"])
    if fragment.residual_N is not None and "residual" in saved:
        fragment.residual_N.copy_(saved["residual"])
    last = saved.get("last")
    fragment.last = (
        None
        if last is None
        else (last["mean"].to(device), last["delta"].to(device), int(last["participants"]))
    )
    copy_flat_into_(fragment.params, saved["params"].to(device))


def in_flight_state(pending: InFlight) -> dict[str, Any]:
    assert pending.result is not None
    state: dict[str, Any] = {
        "fragment": pending.fragment,
        "merge_step": pending.merge_step,
        "delta": pending.delta_N.cpu(),
        "mean": pending.result.mean.cpu(),
        "participants": pending.result.participants,
        "bytes_sent": pending.result.bytes_sent,
        "bytes_received": pending.result.bytes_received,
    }
    if pending.estimate_N is not None:
        state["estimate"] = pending.estimate_N.cpu()
    return state
