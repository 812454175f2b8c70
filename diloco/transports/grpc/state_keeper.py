"""The group's shared state on the coordinator: the outer step, its hash, its copy on disk.

The coordinator takes the outer step itself, with the injected outer optimizer (the same rule
the islands apply) and the mean decoded from the bytes it sent them, so its state is always
bit-identical to theirs. The step, the hash and the save run in a background thread once the
islands are done with a round's answers; `settle` waits for them before anything reads the
state.

With `offload_state` (outer.offload_state) the outer optimizer's state lives in files in the
state folder between uses (diloco/offload.py): the step takes it a slice at a time, a download
and a save drop what they read; the coordinator holds the anchor and the round's mean.

Readers (`read_chunks`) copy the state chunk by chunk under a lock the step also takes, and
fail with `StateChanged` if a step happened meanwhile (the caller retries): a slow or stalled
download never holds a copy of the whole state, and never sees half of two rounds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from diloco.checkpoint import list_checkpoints, newest_intact, save_checkpoint
from diloco.codecs.base import Codec
from diloco.codecs.floating import NoneCodec
from diloco.offload import OffloadedState, check_sliceable
from diloco.shared_state import OuterOptimizer, SharedState, params_sha256
from diloco.transports.dataplane.buffers import ReusedBuffers
from diloco.transports.dataplane.codec_chunks import decode_into

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
ANSWERS_FIRST_S = 5.0
"""The longest a round's outer step waits for the islands to be done with the round's answers."""
_ANSWER_POLL_S = 0.02

AnswersSent = Callable[[float], bool]
"""Wait up to the given seconds for a round's answers to be sent and used (on the data plane:
each island closes its stream once it has decoded its answer); whether they all were."""


class StateChanged(RuntimeError):
    """The shared state moved on while it was being read: read it again."""


class StateKeeper:
    """Args:
    optimizer: the outer step (the composition root's one object).
    codec: the run's codec (the mean is decoded from its payload).
    state_dir: where the state is persisted after every round (None: not persisted).
    offload_state: keep the outer optimizer's state in files in `state_dir`/outer-state between
        uses (needs a `state_dir` and an optimizer that steps in slices: sgd).
    """

    def __init__(
        self,
        optimizer: OuterOptimizer,
        codec: Codec,
        state_dir: Path | None,
        *,
        offload_state: bool = False,
    ):
        self.optimizer = optimizer
        self.codec = codec
        self.state_dir = state_dir
        self.state: SharedState | None = None
        self.sha = ""
        self.generation = 0
        self._lock = threading.Lock()  # held while the tensors change or a chunk is copied
        self._worker: threading.Thread | None = None
        self._hurry = threading.Event()
        self._error: BaseException | None = None
        # The decoded mean of each round, in the last round's buffer: no model-sized vector
        # to fault in per round. Codec none needs none (its mean is a view of the payload).
        self._decoded = None if isinstance(codec, NoneCodec) else ReusedBuffers(keep=1)
        self._offload_dir: Path | None = None
        self._offloaded: OffloadedState | None = None
        if offload_state:
            if state_dir is None:
                raise ValueError("a coordinator keeps its outer state on disk in its state folder")
            check_sliceable(optimizer)
            self._offload_dir = state_dir / "outer-state"

    @property
    def numel(self) -> int:
        return 0 if self.state is None else self.state.anchor.numel()

    def seed(self, state: SharedState, persist: dict[str, Any], *, owned: bool = False) -> None:
        """Take `state` as the group's (a copy of it, unless `owned`: nothing else holds it, as
        a state read from the wire); `persist` goes into the saved file."""
        if self._offload_dir is not None and not owned:  # the outer state goes to its files
            anchor = state.anchor.detach().to(torch.float32).cpu().clone()
            state = SharedState(state.round, anchor, state.outer_state)
        elif not owned:
            state = state.copy()
        with self._lock:  # the files are written in place: no download reads them meanwhile
            self.state = self._kept(state)
            self.generation += 1
        self.sha = params_sha256(self.state.anchor)
        self._save(persist)

    def step_in_background(
        self,
        mean_payload: torch.Tensor,
        persist: Callable[[str], dict[str, Any]],
        answers_sent: AnswersSent | None = None,
    ) -> None:
        """Apply the round's mean, hash and save, in a background thread.

        `persist(sha_after)` returns what to save next to the state. With `answers_sent`, the
        step first waits until the islands are done with the round's answers (for at most
        ANSWERS_FIRST_S, and no longer once a caller needs the state: `settle`): the islands
        wait for their answer and decode it, nobody waits for the step until the next round,
        and on a machine the coordinator shares with islands the step's passes over the state
        would otherwise slow the sending and the decoding of the answers (25M int8 values,
        2 islands: their decoding 21-29 ms against 13.5 ms, docs/results/streaming.md).
        """
        self.settle()
        self._hurry.clear()
        self._worker = threading.Thread(
            target=self._step,
            args=(mean_payload, persist, answers_sent),
            name="outer-step",
            daemon=True,
        )
        self._worker.start()

    def settle(self) -> None:
        """Wait for the previous round's step and save; re-raise their failure."""
        if self._worker is not None:
            self._hurry.set()
            self._worker.join()
            self._worker = None
        if self._error is not None:
            raise RuntimeError(f"the coordinator could not finish a round: {self._error}") from (
                self._error
            )

    def read_chunks(self, generation: int) -> Iterator[bytes]:
        """The state's bytes (every tensor of `SharedState.tensors`, in order), chunk by chunk.

        Raises:
            StateChanged: a round's step changed the state since `generation`.
        """
        assert self.state is not None
        for _, tensor in self.state.tensors():
            flat = tensor.reshape(-1)
            per_chunk = max(1, CHUNK_BYTES // flat.element_size())
            for start in range(0, max(1, flat.numel()), per_chunk):
                with self._lock:
                    if self.generation != generation:
                        raise StateChanged("the shared state changed during the download")
                    piece = flat[start : start + per_chunk]
                    data = piece.contiguous().numpy().tobytes()
                    if self._offloaded is not None:
                        self._offloaded.release_read(tensor, start, start + per_chunk)
                yield data

    def _step(
        self,
        mean_payload: torch.Tensor,
        persist: Callable[[str], dict[str, Any]],
        answers_sent: AnswersSent | None,
    ) -> None:
        if answers_sent is not None:
            until = time.monotonic() + ANSWERS_FIRST_S
            while not self._hurry.is_set() and time.monotonic() < until:
                if answers_sent(_ANSWER_POLL_S):
                    break
        try:
            assert self.state is not None
            state = self.state
            # A view of a `none` mean's bytes: no fp32 copy (the payload is never written to).
            numel = state.anchor.numel()
            spare_N = None
            if self._decoded is not None and state.anchor.device.type == "cpu":
                spare_N = self._decoded.take(4 * numel).view(torch.float32)
            mean_N = decode_into(self.codec, mean_payload, numel, spare_N)
            outer_state = dict(state.outer_state)
            with self._lock:
                if self._offloaded is not None:
                    self._offloaded.step_in_slices(
                        self.optimizer, state.anchor, mean_N, state.round
                    )
                    outer_state = self._offloaded.state
                else:
                    self.optimizer.step_(state.anchor, mean_N, outer_state, state.round)
                self.state = SharedState(state.round + 1, state.anchor, outer_state)
                self.generation += 1
            self.sha = params_sha256(self.state.anchor)
        except BaseException as error:  # re-raised by settle, in a caller's thread
            self._error = error
            return
        try:
            self._save(persist(self.sha))
        except Exception:  # the state in memory is right: the group goes on without the copy
            log.exception("could not save the coordinator's state of round %d", self.state.round)

    def _save(self, persist: dict[str, Any]) -> None:
        if self.state_dir is None or self.state is None:
            return
        state = {
            "round": self.state.round,
            "sha256": self.sha,
            "anchor": self.state.anchor,
            "outer_state": dict(self.state.outer_state),
            **persist,
        }
        # With the outer state in files, each chunk the save reads is dropped at once.
        release = None if self._offloaded is None else self._offloaded.release_read
        save_checkpoint(self.state_dir, self.state.round, state, keep=2, after_read=release)

    def _kept(self, state: SharedState) -> SharedState:
        """`state` as the keeper holds it: with offload_state, its outer state in the files."""
        if self._offload_dir is None:
            return state
        numel = state.anchor.numel()
        if self._offloaded is None or self._offloaded.numel != numel:
            self._offloaded = OffloadedState(self._offload_dir, dict(state.outer_state), numel)
        else:
            self._offloaded.load(state.outer_state)
        return SharedState(state.round, state.anchor, self._offloaded.state)

    def restore(self) -> dict[str, Any] | None:
        """Load the newest intact saved state; returns what was saved with it (or None)."""
        if self.state_dir is None:
            return None
        found = newest_intact(self.state_dir, list_checkpoints(self.state_dir))
        if found is None:
            return None
        _, saved = found
        anchor = saved["anchor"].to(torch.float32)
        if params_sha256(anchor) != saved["sha256"]:
            raise RuntimeError(
                f"the coordinator state in {self.state_dir} is corrupt (hash differs)"
            )
        restored = SharedState(int(saved["round"]), anchor, dict(saved["outer_state"]))
        self.state = self._kept(restored)
        self.sha = str(saved["sha256"])
        self.generation += 1
        return saved
