"""The torch transport: one process per island in a torch.distributed group.

gloo on CPU, nccl on GPU, for islands inside one datacenter. fp32 payloads (codec `none`) are
summed in place by `all_reduce`, the cheapest exchange (a ring moves 2 (N - 1) / N of the
payload per island); compressed payloads cannot be summed as bytes, so each island broadcasts
its own and every island decodes and sums them all in rank order. Both give every island the
same bits.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from diloco.aggregate import weighted_mean
from diloco.codecs.base import Codec
from diloco.transports.base import (
    AverageResult,
    check_fingerprints,
    newest_common_round,
    ring_allreduce_bytes,
)


class TorchDistributedTransport:
    """One island's handle on a torch.distributed process group.

    Args:
        codec: the codec of every payload in the group.
        numel: elements of the shared parameter vector.
        rank: this island's index in [0, num_islands).
        num_islands: the world size.
        init_method: env://, tcp://host:port or file:///path (ignored when `store` is given).
        backend: gloo or nccl.
        timeout_s: how long a collective may wait for the slowest island.
        store: a rendezvous store made by the caller (tests own theirs).
        group: on islands of several ranks, the process group of this rank's shard index
            across islands (rank r of every island, in island order); the world group is
            then made by the caller. None: the whole world is the group of islands.
    """

    def __init__(
        self,
        codec: Codec,
        numel: int,
        *,
        rank: int,
        num_islands: int,
        init_method: str = "env://",
        backend: str = "gloo",
        timeout_s: float = 600.0,
        store: Any = None,
        group: Any = None,
    ):
        self.codec = codec
        self.numel = numel
        self.rank = rank
        self.num_islands = num_islands
        self.backend = backend
        self._group = group
        self._owns_group = group is None and not dist.is_initialized()
        if self._owns_group:
            timeout = datetime.timedelta(seconds=timeout_s)
            if store is not None:
                dist.init_process_group(
                    backend, store=store, rank=rank, world_size=num_islands, timeout=timeout
                )
            else:
                try:
                    dist.init_process_group(
                        backend,
                        init_method=init_method,
                        rank=rank,
                        world_size=num_islands,
                        timeout=timeout,
                    )
                except dist.DistNetworkError as error:  # rank 0 could not listen, or none came
                    words = str(error).strip().splitlines()[0] if str(error).strip() else ""
                    raise OSError(f"transport.torch.init_method {init_method}: {words}") from None
        place = (dist.get_rank(group), dist.get_world_size(group))
        if place != (rank, num_islands):
            raise ValueError(
                f"the process group has rank {place[0]} of {place[1]}, "
                f"the config says transport.rank={rank} of transport.islands={num_islands}"
            )
        # Collectives name a source by its rank in the world, not in the group.
        self._world_ranks = (
            dist.get_process_group_ranks(group) if group is not None else list(range(num_islands))
        )
        self._comm_device = (
            torch.device("cuda", torch.cuda.current_device())
            if (backend == "nccl")
            else torch.device("cpu")
        )

    def join(self, available_rounds: Sequence[int], fingerprint: Mapping[str, str]) -> int | None:
        mine = (sorted(set(available_rounds)), dict(fingerprint))
        everyone: list[Any] = [None] * self.num_islands
        # Lists of ints and strings only; the objects come from our own group's processes.
        dist.all_gather_object(everyone, mine, group=self._group)
        check_fingerprints([fp for _, fp in everyone])
        return newest_common_round([rounds for rounds, _ in everyone])

    def average(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None = None,
    ) -> AverageResult:
        # Islands here resume together from checkpoints: the hash needs no check.
        del params_sha256
        home = payload.device
        weights, rounds = self._exchange_weights(weight, round)
        if len(set(rounds)) != 1:
            raise RuntimeError(f"islands disagree on the round: {rounds}")
        total = sum(weights)
        if self.codec.name == "none":
            scaled = self.codec.decode(payload, self.numel).to(self._comm_device)
            scaled.mul_(weight / total)
            dist.all_reduce(scaled, op=dist.ReduceOp.SUM, group=self._group)
            wire = ring_allreduce_bytes(payload.numel(), self.num_islands)
            return AverageResult(scaled.to(home), self.num_islands, wire, wire)
        decoded = [self.codec.decode(p, self.numel) for p in self._gather(payload)]
        mean = weighted_mean(decoded, weights)
        wire = (self.num_islands - 1) * payload.numel()
        return AverageResult(mean.to(home), self.num_islands, wire, wire)

    def _gather(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """Every island's payload, in rank order (payloads of one codec have equal sizes).

        One broadcast per rank rather than gloo's all_gather, which moved the same bytes
        about 5x slower on loopback (bench/loopback.py: 589 ms against 91 ms for a
        124M-element int8 payload between 2 processes) and made compression lose to fp32.
        """
        mine = payload.to(self._comm_device)
        gathered = []
        for source in range(self.num_islands):
            buffer = mine if source == self.rank else torch.empty_like(mine)
            dist.broadcast(buffer, src=self._world_ranks[source], group=self._group)
            gathered.append(buffer)
        return gathered

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def _exchange_weights(self, weight: float, round: int) -> tuple[list[float], list[int]]:
        mine = torch.tensor([[weight, float(round)]], dtype=torch.float64, device=self._comm_device)
        everyone = [torch.empty_like(mine) for _ in range(self.num_islands)]
        dist.all_gather(everyone, mine, group=self._group)
        rows = torch.cat(everyone).cpu().tolist()
        return [row[0] for row in rows], [int(row[1]) for row in rows]
