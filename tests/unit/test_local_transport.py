"""LocalGroup / LocalTransport: N in-process islands (threads) averaging through a barrier."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from diloco.codecs import NoneCodec
from diloco.outer import weighted_mean
from diloco.transports import AverageResult, LocalGroup, ring_allreduce_bytes

SAME = {"model": "same"}

NUMEL = 10
JOIN_S = 20.0  # a bug must fail the test, never hang the suite


def run_islands(
    fn: Callable[[int], Any], num_islands: int
) -> tuple[list[Any], list[BaseException | None]]:
    """Run fn(rank) in one thread per island; return each island's result and error."""
    results: list[Any] = [None] * num_islands
    errors: list[BaseException | None] = [None] * num_islands

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as error:
            errors[rank] = error

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(num_islands)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "an island is still waiting"
    return results, errors


def deltas(num_islands: int, round: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * round + num_islands)
    return [torch.randn(NUMEL, generator=gen) for _ in range(num_islands)]


@pytest.mark.parametrize("num_islands", [1, 2, 3])
def test_every_island_gets_the_same_weighted_mean(num_islands: int) -> None:
    """Over three rounds each island receives, bit for bit, weighted_mean of the decoded
    payloads in island order, with participants and ring all-reduce bytes."""
    codec = NoneCodec()
    group = LocalGroup(num_islands, codec, NUMEL, timeout_s=JOIN_S)
    transports = [group.transport(rank) for rank in range(num_islands)]
    weights = [float(100 * (rank + 1)) for rank in range(num_islands)]

    def island(rank: int) -> list[AverageResult]:
        return [
            transports[rank].average(codec.encode(deltas(num_islands, r)[rank]), weights[rank], r)
            for r in range(3)
        ]

    results, errors = run_islands(island, num_islands)
    assert errors == [None] * num_islands
    payload_bytes = codec.payload_bytes(NUMEL)
    wire = ring_allreduce_bytes(payload_bytes, num_islands)
    for r in range(3):
        expected = weighted_mean(deltas(num_islands, r), weights)
        for rank in range(num_islands):
            result = results[rank][r]
            assert torch.equal(result.mean, expected), (r, rank)
            assert result.participants == num_islands
            assert result.bytes_sent == result.bytes_received == wire
    if num_islands > 1:
        first, second = results[0][0].mean, results[1][0].mean
        assert first.data_ptr() != second.data_ptr()  # each island may change its own copy


def test_ring_allreduce_bytes() -> None:
    """2 (N - 1) / N of the payload each way: nothing alone, the payload for a pair."""
    assert ring_allreduce_bytes(1000, 1) == 0
    assert ring_allreduce_bytes(1000, 2) == 1000
    assert ring_allreduce_bytes(900, 3) == 1200
    assert ring_allreduce_bytes(1000, 4) == 1500
    assert ring_allreduce_bytes(10, 3) == 13  # whole bytes, rounded down


def test_islands_disagreeing_on_the_round_all_fail() -> None:
    """Islands at different rounds is a broken run: every island gets a RuntimeError saying
    so, none hangs or gets a mean."""
    codec = NoneCodec()
    group = LocalGroup(3, codec, NUMEL, timeout_s=JOIN_S)

    def island(rank: int) -> AverageResult:
        return group.transport(rank).average(
            codec.encode(torch.ones(NUMEL)), 1.0, round=min(rank, 1)
        )

    results, errors = run_islands(island, 3)
    assert results == [None, None, None]
    for error in errors:
        assert isinstance(error, RuntimeError)
        assert "islands disagree on the round: [0, 1]" in str(error)


def test_a_malformed_payload_fails_every_island() -> None:
    """A payload of the wrong size is refused by the codec, and every island hears of it."""
    codec = NoneCodec()
    group = LocalGroup(2, codec, NUMEL, timeout_s=JOIN_S)

    def island(rank: int) -> AverageResult:
        x = torch.ones(NUMEL if rank == 0 else NUMEL + 1)
        return group.transport(rank).average(codec.encode(x), 1.0, round=0)

    _, errors = run_islands(island, 2)
    for error in errors:
        assert isinstance(error, RuntimeError)
        assert "local average of round 0 failed: none payload header" in str(error)


@pytest.mark.parametrize("call", ["average", "join"])
def test_abort_releases_a_waiting_island(call: str) -> None:
    """abort() frees an island blocked in average or join (its peer died) with
    BrokenBarrierError."""
    codec = NoneCodec()
    group = LocalGroup(2, codec, NUMEL, timeout_s=JOIN_S)
    barrier = group._barrier if call == "average" else group._join_barrier
    outcome: list[BaseException] = []

    def lonely() -> None:
        transport = group.transport(0)
        try:
            if call == "average":
                transport.average(codec.encode(torch.ones(NUMEL)), 1.0, round=0)
            else:
                transport.join([1], SAME)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=lonely, daemon=True)
    thread.start()
    deadline = time.monotonic() + JOIN_S
    while barrier.n_waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.001)  # wait until the island is really blocked, not for a fixed time
    assert barrier.n_waiting == 1
    group.abort()
    thread.join(JOIN_S)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], threading.BrokenBarrierError)


def test_join_agrees_on_the_newest_round_every_island_holds() -> None:
    """join is a collective: every island gets the newest round present in all of their
    lists, or None when they share none (start from scratch)."""
    group = LocalGroup(3, NoneCodec(), NUMEL, timeout_s=JOIN_S)
    held = [[1, 2, 5], [2, 5, 7], [5, 2]]
    results, errors = run_islands(lambda rank: group.transport(rank).join(held[rank], SAME), 3)
    assert errors == [None] * 3 and results == [5, 5, 5]

    held = [[1], [2], []]
    results, errors = run_islands(lambda rank: group.transport(rank).join(held[rank], SAME), 3)
    assert errors == [None] * 3 and results == [None, None, None]


def test_single_island_join_needs_no_peer() -> None:
    """One island joins alone, from its own newest checkpoint."""
    transport = LocalGroup(1, NoneCodec(), NUMEL, timeout_s=JOIN_S).transport(0)
    assert transport.join([3, 1], SAME) == 3
    assert transport.join([], SAME) is None


def test_close_and_argument_checks() -> None:
    """close is idempotent; a bad island count or rank is a ValueError naming the range."""
    group = LocalGroup(2, NoneCodec(), NUMEL)
    transport = group.transport(1)
    assert (transport.rank, transport.num_islands) == (1, 2)
    transport.close()
    transport.close()
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        group.transport(2)
    with pytest.raises(ValueError, match="num_islands must be >= 1, got 0"):
        LocalGroup(0, NoneCodec(), NUMEL)


def test_join_refuses_islands_whose_fingerprints_differ() -> None:
    """An island with another model (or H, codec...) is refused on every island, and the
    message names what differs and each island's value."""
    group = LocalGroup(2, NoneCodec(), numel=4)
    prints = [{"model": "a", "outer.inner_steps": "50"}, {"model": "a", "outer.inner_steps": "20"}]
    results, errors = run_islands(lambda rank: group.transport(rank).join([], prints[rank]), 2)
    assert all(error is not None for error in errors), results
    for error in errors:
        assert "outer.inner_steps: island 0 50, island 1 20" in str(error)
        assert "model" not in str(error)
