"""The one suite every Transport passes (after torchft's run_multi_recovery_test).

Each test runs a scenario on every island of a group and checks what the islands saw. A group
is `local` (N threads on one LocalGroup) or `torch` (N spawned gloo processes on a TCPStore the
test owns), with N = 2 and 3. A new transport joins the suite by adding a `GroupKind`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from harness import connect_store, run_threads, spawn_children, tcp_store

from diloco.codecs import Codec, NoneCodec
from diloco.outer import weighted_mean
from diloco.transports import (
    GroupMismatchError,
    LocalGroup,
    TorchDistributedTransport,
    Transport,
    ring_allreduce_bytes,
)

NUMEL = 1000
RANDOM_ROUNDS = 3  # rounds of random vectors and unequal weights, then one exactly summable


class Fp16Codec:
    """A user's codec: fp16 on the wire, no header. Implements the Codec protocol without
    inheriting anything, to show that transports take any object with this shape."""

    name = "user-fp16"

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        return x_N.detach().to(torch.float16).contiguous().view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        if payload.numel() != 2 * numel:
            raise ValueError(f"expected {2 * numel} bytes, got {payload.numel()}")
        return payload.clone().view(torch.float16).to(torch.float32)

    def payload_bytes(self, numel: int) -> int:
        return 2 * numel


# --- what every island sends ------------------------------------------------------------------


def island_vector(rank: int, round: int) -> torch.Tensor:
    """Island `rank`'s pseudo-gradient in `round`: random for the first rounds, then small
    multiples of 1/16, whose weighted sums are exact in fp32 in any order."""
    generator = torch.Generator().manual_seed(1000 * round + rank)
    if round < RANDOM_ROUNDS:
        return torch.randn(NUMEL, generator=generator)
    return torch.randint(-64, 65, (NUMEL,), generator=generator).float() / 16


def island_weight(rank: int, round: int, num_islands: int) -> float:
    """Tokens of island `rank` in `round`: unequal; powers-of-two fractions in the exact round."""
    if round < RANDOM_ROUNDS:
        return float(100 + 37 * rank + 11 * round)
    power = 1 << (2 * num_islands - 1).bit_length()  # a power of two >= 2 N
    return 1.0 if rank < num_islands - 1 else float(power - (num_islands - 1))


def expected_mean(codec: Codec, round: int, num_islands: int) -> torch.Tensor:
    """What every island must get: weighted_mean of the decoded payloads, in rank order."""
    decoded = [
        codec.decode(codec.encode(island_vector(rank, round)), NUMEL) for rank in range(num_islands)
    ]
    weights = [island_weight(rank, round, num_islands) for rank in range(num_islands)]
    return weighted_mean(decoded, weights)


# --- scenarios: scenario(transport, codec, *args) on every island; plain data back ----------


def average_rounds(transport: Transport, codec: Codec, rounds: int) -> list[dict[str, Any]]:
    seen = []
    for round in range(rounds):
        payload = codec.encode(island_vector(transport.rank, round))
        weight = island_weight(transport.rank, round, transport.num_islands)
        result = transport.average(payload, weight=weight, round=round)
        seen.append(
            {
                "mean": result.mean.numpy().tobytes(),
                "dtype": str(result.mean.dtype),
                "participants": result.participants,
                "bytes_sent": result.bytes_sent,
                "bytes_received": result.bytes_received,
                "payload_bytes": payload.numel(),
            }
        )
    return seen


SAME_GROUP = {"model": "gpt-4x128", "outer.inner_steps": "50"}


def join_cases(
    transport: Transport, codec: Codec, cases: list[list[list[int]]]
) -> list[int | None]:
    return [transport.join(rounds[transport.rank], SAME_GROUP) for rounds in cases]


def join_with_another_model(transport: Transport, codec: Codec) -> str | None:
    """The last island runs another model: every island must refuse to join, naming it."""
    fingerprint = dict(SAME_GROUP)
    if transport.rank == transport.num_islands - 1:
        fingerprint["model"] = "mlp-2x64"
    try:
        transport.join([1, 2], fingerprint)
    except GroupMismatchError as error:
        return str(error)
    return None


def average_on_wrong_round(transport: Transport, codec: Codec) -> str | None:
    """Island 0 says round 0, the others round 1: every island must refuse."""
    payload = codec.encode(island_vector(transport.rank, 0))
    try:
        transport.average(payload, weight=1.0, round=0 if transport.rank == 0 else 1)
    except RuntimeError as error:
        return str(error)
    return None


# --- the groups: each island runs the whole plan, in order, on one transport per entry -------

JOIN_CASES: list[tuple[str, list[list[int]], int | None]] = [
    # (name, the rounds each island holds (the first N lists are used), the expected answer)
    ("same lists", [[1, 2, 3]] * 3, 3),
    ("newest common round", [[1, 2, 3, 5], [2, 3, 4], [7, 3, 2]], 3),
    ("one island ahead", [[4, 5, 6], [4, 5], [3, 4, 5]], 5),
    ("nothing in common", [[1], [2], [3]], None),
    ("one island has none", [[1, 2], [], [1, 2]], None),
    ("nobody has any", [[], [], []], None),
]

PLAN: list[tuple[str, Callable[..., Any], Codec, tuple[Any, ...]]] = [
    # (name, scenario, codec of the transport, scenario arguments after transport and codec)
    ("none", average_rounds, NoneCodec(), (RANDOM_ROUNDS + 1,)),
    ("join", join_cases, NoneCodec(), ([lists for _, lists, _ in JOIN_CASES],)),
    ("user codec", average_rounds, Fp16Codec(), (2,)),
    ("wrong round", average_on_wrong_round, NoneCodec(), ()),
    ("another model", join_with_another_model, NoneCodec(), ()),
]


def _run_plan(transports: list[Transport], plan: list[Any]) -> dict[str, Any]:
    return {
        name: scenario(transport, codec, *args)
        for transport, (name, scenario, codec, args) in zip(transports, plan, strict=True)
    }


def _local_group(num_islands: int, plan: list[Any]) -> list[dict[str, Any]]:
    groups = [LocalGroup(num_islands, codec, NUMEL, timeout_s=30) for _, _, codec, _ in plan]
    per_island = [([g.transport(rank) for g in groups], plan) for rank in range(num_islands)]
    try:
        return run_threads(_run_plan, per_island, timeout_s=60)
    finally:
        for group in groups:
            group.abort()


def _torch_island(port: int, rank: int, num_islands: int, plan: list[Any]) -> dict[str, Any]:
    store = connect_store(port)
    # The first transport creates the process group; the others share it.
    transports = [
        TorchDistributedTransport(
            codec, NUMEL, rank=rank, num_islands=num_islands, store=store, timeout_s=30
        )
        for _, _, codec, _ in plan
    ]
    try:
        return _run_plan(transports, plan)
    finally:
        for transport in reversed(transports):
            transport.close()


def _torch_group(num_islands: int, plan: list[Any]) -> list[dict[str, Any]]:
    store = tcp_store()
    return spawn_children(
        _torch_island,
        [(store.port, rank, num_islands, plan) for rank in range(num_islands)],
        timeout_s=90,
    )


def _ring_bytes(codec: Codec, payload_bytes: int, num_islands: int) -> int:
    return ring_allreduce_bytes(payload_bytes, num_islands)


def _torch_bytes(codec: Codec, payload_bytes: int, num_islands: int) -> int:
    # Documented in diloco/transports/torch_distributed.py: fp32 is all-reduced (a ring),
    # other codecs are broadcast by each island (its payload reaches N - 1 peers).
    if codec.name == "none":
        return ring_allreduce_bytes(payload_bytes, num_islands)
    return (num_islands - 1) * payload_bytes


@dataclass(frozen=True)
class GroupKind:
    run: Callable[[int, list[Any]], list[dict[str, Any]]]
    """Run a plan on N islands; every island's {name: result}, in rank order."""
    wire_bytes: Callable[[Codec, int, int], int]
    """Bytes one island sends (and receives) per average, as the implementation documents."""


KINDS = {
    "local": GroupKind(_local_group, _ring_bytes),
    "torch": GroupKind(_torch_group, _torch_bytes),
}


@dataclass(frozen=True)
class Group:
    kind: GroupKind
    num_islands: int
    results: list[dict[str, Any]]
    """What each island's scenarios returned, by plan name."""

    def seen(self, name: str) -> list[Any]:
        return [island[name] for island in self.results]


@pytest.fixture(
    scope="module",
    params=[("local", 2), ("local", 3), ("torch", 2), ("torch", 3)],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def group(request: pytest.FixtureRequest) -> Group:
    """A group of N islands that has run PLAN (once per group: spawning costs seconds)."""
    name, num_islands = request.param
    kind = KINDS[name]
    return Group(kind, num_islands, kind.run(num_islands, PLAN))


def _mean(seen: dict[str, Any]) -> torch.Tensor:
    return torch.frombuffer(bytearray(seen["mean"]), dtype=torch.float32)


# --- the suite -----------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_mean_is_the_weighted_mean(group: Group) -> None:
    """Each round's mean is the token-weighted mean of the islands' vectors: within fp32
    rounding for random data (a transport may sum in another order), bit-exact for data whose
    weighted sums are exact in fp32 whatever the order."""
    codec = NoneCodec()
    for island, rounds in enumerate(group.seen("none")):
        assert len(rounds) == RANDOM_ROUNDS + 1
        for round, seen in enumerate(rounds):
            assert seen["dtype"] == "torch.float32"
            expected = expected_mean(codec, round, group.num_islands)
            got = _mean(seen)
            if round < RANDOM_ROUNDS:
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(got, expected), f"island {island} round {round} is not exact"


@pytest.mark.timeout(150)
def test_mean_is_bit_identical_on_every_island(group: Group) -> None:
    """Every island receives the same bits in every round (the invariant behind identical
    params_sha256 across islands)."""
    for round in range(RANDOM_ROUNDS + 1):
        means = {island_rounds[round]["mean"] for island_rounds in group.seen("none")}
        assert len(means) == 1, f"round {round}: {len(means)} different means across islands"


@pytest.mark.timeout(150)
def test_participants_and_bytes(group: Group) -> None:
    """participants is N; bytes_sent and bytes_received are what a ring all-reduce of the fp32
    payload moves (header included), every round."""
    codec = NoneCodec()
    payload_bytes = codec.payload_bytes(NUMEL)
    expected = group.kind.wire_bytes(codec, payload_bytes, group.num_islands)
    assert expected == ring_allreduce_bytes(payload_bytes, group.num_islands)
    for rounds in group.seen("none"):
        for seen in rounds:
            assert seen["payload_bytes"] == payload_bytes
            assert seen["participants"] == group.num_islands
            assert (seen["bytes_sent"], seen["bytes_received"]) == (expected, expected)


@pytest.mark.timeout(150)
def test_join_agrees_on_the_newest_common_round(group: Group) -> None:
    """join() returns, on every island, the newest round every island holds, or None when no
    round is held by all (a fresh start)."""
    answers = group.seen("join")
    for index, (name, lists, expected) in enumerate(JOIN_CASES):
        got = [island_answers[index] for island_answers in answers]
        lists = lists[: group.num_islands]
        assert got == [expected] * group.num_islands, f"{name}: {lists} -> {got}"


@pytest.mark.timeout(150)
def test_islands_disagreeing_on_the_round_raise(group: Group) -> None:
    """An average where islands name different rounds fails on every island, naming it."""
    messages = group.seen("wrong round")
    for island, message in enumerate(messages):
        assert message is not None, f"island {island} averaged across different rounds"
        assert "disagree on the round" in message
        assert "[0, 1" in message


@pytest.mark.timeout(150)
def test_user_codec_without_inheritance(group: Group) -> None:
    """A codec defined here (fp16, no header, no base class) travels through the transport's
    generic path (all-gather for torch): the mean is weighted_mean of the decoded payloads in
    rank order, bit for bit, identical everywhere, with the documented byte counts."""
    codec = Fp16Codec()
    seen_by_island = group.seen("user codec")
    expected_bytes = group.kind.wire_bytes(codec, codec.payload_bytes(NUMEL), group.num_islands)
    for island, rounds in enumerate(seen_by_island):
        for round, seen in enumerate(rounds):
            assert seen["payload_bytes"] == 2 * NUMEL
            expected = expected_mean(codec, round, group.num_islands)
            assert torch.equal(_mean(seen), expected), f"island {island} round {round}"
            assert seen["participants"] == group.num_islands
            assert (seen["bytes_sent"], seen["bytes_received"]) == (expected_bytes,) * 2


@pytest.mark.timeout(150)
def test_islands_with_another_model_are_refused_at_join(group: Group) -> None:
    """join() compares fingerprints: a differing entry fails on every island, and the message
    names the entry and each island's value."""
    for island, message in enumerate(group.seen("another model")):
        assert message is not None, f"island {island} joined a group running another model"
        assert "islands differ and cannot average together: model:" in message
        assert f"island {group.num_islands - 1} mlp-2x64" in message
        assert "island 0 gpt-4x128" in message
        assert "inner_steps" not in message  # only what differs is named
