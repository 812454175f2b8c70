"""Serving the group's shared state to newcomers, and downloading it from a peer.

Each island serves the shared state after its last round (anchor and outer optimizer state,
`diloco.shared_state.SharedState`). The state after a round is only computed when a peer asks
for it: the island keeps the state from before the round (copied in the background while the
round is averaged) and the round's mean, and applies the injected outer optimizer to them on
request, which gives the bits the island's own `OuterSync` holds after the same step. With a
run token a served state carries a tag over its content (auth.py), and a downloaded one
without a valid tag is refused.

hivemind's state sharing: `DecentralizedAverager.load_state_from_peers` (1.1.12).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from diloco.shared_state import OuterOptimizer, SharedState
from diloco.transports.hivemind.auth import RunToken
from diloco.transports.hivemind.averager import IslandAverager

log = logging.getLogger(__name__)


class StateServer:
    """The state this island serves, and its check of the states it downloads.

    Args:
        optimizer: the injected outer step (to compute the state after a round).
        numel: elements of the shared parameter vector.
        token: the run token, or None.
        serving: False for a client-mode island (it serves nothing).
    """

    def __init__(
        self, optimizer: OuterOptimizer, numel: int, token: RunToken | None, *, serving: bool
    ):
        self.optimizer = optimizer
        self.numel = numel
        self.token = token
        self.serving = serving
        self.live: SharedState | None = None
        """The island's own state (OuterSync's tensors, updated in place by each round)."""
        self._served: SharedState | None = None
        self._pending: tuple[int, SharedState, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def serve(self, state: SharedState, averager: IslandAverager) -> None:
        """Serve `state` (a copy the island no longer changes) from now on."""
        with self._lock:
            self._served, self._pending = state, None
        averager.allow_state_sharing = self.serving
        if self.serving:
            averager.state_sharing_priority = float(state.round)

    def after_round(
        self, round: int, snapshot: Snapshot, mean_N: torch.Tensor, averager: IslandAverager
    ) -> None:
        """Serve the state after `round`, computed from the state before it and its mean only
        when a peer asks (the island applies the same step to its own copy meanwhile)."""
        before = snapshot.wait()
        if before is None:
            return
        with self._lock:
            self._pending = (round, before, mean_N)
        if averager.allow_state_sharing:
            averager.state_sharing_priority = float(round + 1)

    def state_for_peer(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """(metadata, tensors) for a peer; runs in hivemind's helper thread of this process."""
        with self._lock:
            if self._pending is not None:
                round, before, mean_N = self._pending
                outer_state = dict(before.outer_state)
                self.optimizer.step_(before.anchor, mean_N, outer_state, round)
                self._served = SharedState(round + 1, before.anchor, outer_state)
                self._pending = None
            state = self._served
        if state is None:
            return {}, []
        names = [name for name, _ in state.tensors()]
        tensors = [tensor for _, tensor in state.tensors()]
        metadata: dict[str, Any] = {"round": state.round, "numel": self.numel, "tensors": names}
        if self.token is not None:
            metadata["tag"] = self.token.sign("state", metadata, _digest(tensors))
        return metadata, tensors

    def download(self, averager: IslandAverager, timeout_s: float) -> SharedState | None:
        """The newest state a peer serves, or None (none served, or refused: logged)."""
        answer = averager.load_state_from_peers(timeout=timeout_s)
        if answer is None:
            return None
        metadata, tensors = answer
        if not self._well_formed(metadata, tensors):
            log.warning("hivemind: a peer served a state of another shape: ignored")
            return None
        if self.token is not None:
            body = {key: metadata[key] for key in ("round", "numel", "tensors")}
            if not self.token.verify(metadata.get("tag"), "state", body, _digest(tensors)):
                log.warning("hivemind: a peer served a state without the run token's tag: ignored")
                return None
        names = metadata["tensors"]
        copied = {str(name): t.detach().clone() for name, t in zip(names, tensors, strict=True)}
        anchor_N = copied.pop("anchor").to(torch.float32).reshape(-1)
        return SharedState(int(metadata["round"]), anchor_N, copied)

    def _well_formed(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> bool:
        if not isinstance(metadata, dict):
            return False
        names = metadata.get("tensors")
        return (
            metadata.get("numel") == self.numel
            and isinstance(metadata.get("round"), int)
            and isinstance(names, list)
            and len(names) == len(tensors)
            and bool(names)
            and names[0] == "anchor"
            and all(t.numel() in (self.numel, 1) for t in tensors)
            and tensors[0].numel() == self.numel
        )


class Snapshot:
    """A copy of the shared state taken in the background while the round is averaged."""

    def __init__(self, live: SharedState | None):
        self._copy: SharedState | None = None
        self._thread: threading.Thread | None = None
        if live is not None:
            self._thread = threading.Thread(target=self._take, args=(live,), daemon=True)
            self._thread.start()

    def _take(self, live: SharedState) -> None:
        self._copy = live.copy()

    def wait(self) -> SharedState | None:
        if self._thread is not None:
            self._thread.join()
        return self._copy


def _digest(tensors: Sequence[torch.Tensor]) -> str:
    """sha256 of the tensors' dtypes and bytes, in order (what a state's tag covers)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{flat.dtype}:{flat.numel()};".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()
