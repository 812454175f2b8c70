"""The local transport: N islands hosted by one process, averaging through shared memory.

Each island calls `average` from its own thread; a barrier collects the N payloads and its
action, run once, decodes them and sums them in island order. The maths are those of N
processes, and every island receives the same bits. Bytes are counted as a ring all-reduce
of the payloads would move them, so local runs report what a real group would send.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from diloco.aggregate import weighted_mean
from diloco.codecs.base import Codec
from diloco.transports.base import (
    AverageResult,
    GroupMismatchError,
    check_fingerprints,
    newest_common_round,
    ring_allreduce_bytes,
)


class LocalGroup:
    """The shared meeting point of N in-process islands; `transport(rank)` hands out handles."""

    def __init__(self, num_islands: int, codec: Codec, numel: int, timeout_s: float = 600.0):
        if num_islands < 1:
            raise ValueError(f"num_islands must be >= 1, got {num_islands}")
        self.num_islands = num_islands
        self.codec = codec
        self.numel = numel
        self._slots: list[tuple[torch.Tensor, float, int] | None] = [None] * num_islands
        self._mean: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._barrier = threading.Barrier(num_islands, action=self._reduce, timeout=timeout_s)
        self._join_lists: list[list[int]] = [[] for _ in range(num_islands)]
        self._fingerprints: list[Mapping[str, str]] = [{} for _ in range(num_islands)]
        self._joined: int | None = None
        self._join_barrier = threading.Barrier(num_islands, action=self._agree, timeout=timeout_s)

    def transport(self, rank: int) -> LocalTransport:
        if not 0 <= rank < self.num_islands:
            raise ValueError(f"rank must be in [0, {self.num_islands}), got {rank}")
        return LocalTransport(self, rank)

    def abort(self) -> None:
        """Release every island waiting in `average` or `join` with an error (one failed)."""
        self._barrier.abort()
        self._join_barrier.abort()

    def _reduce(self) -> None:
        # Runs once per round, in whichever thread arrived last, before any is released.
        self._error, self._mean = None, None
        try:
            slots = [slot for slot in self._slots if slot is not None]
            assert len(slots) == self.num_islands, "every island must have posted a payload"
            rounds = {round for _, _, round in slots}
            if len(rounds) != 1:
                raise RuntimeError(f"islands disagree on the round: {sorted(rounds)}")
            decoded = [self.codec.decode(payload, self.numel) for payload, _, _ in slots]
            self._mean = weighted_mean(decoded, [weight for _, weight, _ in slots])
        except BaseException as error:  # handed to every island, not lost in one thread
            self._error = error
        finally:
            self._slots = [None] * self.num_islands

    def _agree(self) -> None:
        # Runs once, like `_reduce`: the newest round that every island holds.
        self._error = None
        try:
            check_fingerprints(self._fingerprints)
            self._joined = newest_common_round(self._join_lists)
        except GroupMismatchError as error:
            self._error = error

    def _join(
        self, rank: int, available_rounds: Sequence[int], fingerprint: Mapping[str, str]
    ) -> int | None:
        self._join_lists[rank] = list(available_rounds)
        self._fingerprints[rank] = dict(fingerprint)
        self._join_barrier.wait()
        if self._error is not None:
            raise self._error
        return self._joined

    def _average(self, rank: int, payload: torch.Tensor, weight: float, round: int) -> torch.Tensor:
        self._slots[rank] = (payload, weight, round)
        self._barrier.wait()
        if self._error is not None:
            raise RuntimeError(f"local average of round {round} failed: {self._error}")
        assert self._mean is not None
        return self._mean.clone()


class LocalTransport:
    """One in-process island's handle on its `LocalGroup`."""

    def __init__(self, group: LocalGroup, rank: int):
        self.group = group
        self.rank = rank
        self.num_islands = group.num_islands

    def join(self, available_rounds: Sequence[int], fingerprint: Mapping[str, str]) -> int | None:
        # A collective like `average`: every island calls it, all get the same answer.
        return self.group._join(self.rank, available_rounds, fingerprint)

    def average(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None = None,
    ) -> AverageResult:
        # Islands here resume together from checkpoints: the hash needs no check.
        del params_sha256
        mean = self.group._average(self.rank, payload, weight, round)
        wire_bytes = ring_allreduce_bytes(payload.numel(), self.num_islands)
        return AverageResult(mean, self.num_islands, wire_bytes, wire_bytes)

    def close(self) -> None:
        return None
