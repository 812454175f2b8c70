"""The one suite every Transport passes (after torchft's run_multi_recovery_test).

Each test runs a scenario on every island of a group and checks what the islands saw. A group
is `local` (N threads on one LocalGroup), `torch` (N spawned gloo processes on a TCPStore the
test owns) or `grpc` (a coordinator in this process, bound to port 0, and N spawned islands),
with N = 2 and 3. Where transports differ by design (what join answers, how a payload for
another round is handled, what an island is told when refused), each `GroupKind` states its
documented contract. A new transport joins the suite by adding a `GroupKind`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from harness import connect_store, run_threads, spawn_children, tcp_store

from conformance.hivemind_group import (
    hivemind_another_model,
    hivemind_wire_bytes,
    hivemind_wrong_round,
    run_hivemind_group,
)
from diloco.aggregate import weighted_mean
from diloco.codecs import Codec, Int8Codec, NoneCodec
from diloco.outer.optimizers import SgdOuter, adam_outer
from diloco.outer.sync import OuterHyperparams, OuterSync
from diloco.shared_state import OuterOptimizer, SharedState, params_sha256
from diloco.transports.base import (
    AverageResult,
    GroupMismatchError,
    SharedStateSource,
    Transport,
    newest_common_round,
    ring_allreduce_bytes,
)
from diloco.transports.grpc.client import GrpcTransport
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.coordinator import Coordinator
from diloco.transports.grpc.rounds import RoundRules
from diloco.transports.grpc.service import CoordinatorServer
from diloco.transports.local import LocalGroup
from diloco.transports.torch_distributed import TorchDistributedTransport

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

SAME_GROUP = {"model": "gpt-4x128", "outer.inner_steps": "50"}


class Replica:
    """What an island holds of the shared state in a scenario that calls `average` directly:
    transports that keep the group's state check the hash of the parameters a payload was
    computed from, so the scenario advances its own copy with every mean, as OuterSync does."""

    def __init__(self, optimizer: OuterOptimizer):
        self.optimizer = optimizer
        self.anchor = torch.zeros(NUMEL)
        self.state = optimizer.init_state(self.anchor)
        self.round = 0

    def enter(self, transport: Transport) -> None:
        """Join and take (or seed) the group's state, as an island does before its rounds."""
        transport.join([], SAME_GROUP)
        if isinstance(transport, SharedStateSource):
            group = transport.shared_state(SharedState(0, self.anchor, self.state))
            assert group is None, "a fresh group's state is this island's"

    def sha(self) -> str:
        return params_sha256(self.anchor)

    def apply(self, result: AverageResult) -> None:
        if result.adopt is None:
            self.optimizer.step_(self.anchor, result.mean, self.state, self.round)
            self.round += 1


def average_rounds(transport: Transport, codec: Codec, rounds: int) -> list[dict[str, Any]]:
    replica = Replica(SgdOuter(lr=0.7, momentum=0.9, nesterov=True))
    replica.enter(transport)
    seen = []
    for round in range(rounds):
        payload = codec.encode(island_vector(transport.rank, round))
        weight = island_weight(transport.rank, round, transport.num_islands)
        result = transport.average(payload, weight=weight, round=round, params_sha256=replica.sha())
        replica.apply(result)
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


def join_cases(
    transport: Transport, codec: Codec, cases: list[list[list[int]]]
) -> list[int | None]:
    return [transport.join(rounds[transport.rank], SAME_GROUP) for rounds in cases]


def join_with_another_model(transport: Transport, codec: Codec) -> str | None:
    """The last island runs another model: it must be refused (and, for transports that meet
    collectively, every island), naming what differs."""
    fingerprint = dict(SAME_GROUP)
    if transport.rank == transport.num_islands - 1:
        fingerprint["model"] = "mlp-2x64"
    try:
        transport.join([1, 2], fingerprint)
    except GroupMismatchError as error:
        return str(error)
    return None


def average_on_wrong_round(transport: Transport, codec: Codec) -> str:
    """Island 0 says round 0, the others round 1: no mean may mix the two rounds."""
    replica = Replica(SgdOuter(lr=0.7, momentum=0.9, nesterov=True))
    replica.enter(transport)
    payload = codec.encode(island_vector(transport.rank, 0))
    round = 0 if transport.rank == 0 else 1
    try:
        result = transport.average(payload, weight=1.0, round=round, params_sha256=replica.sha())
    except RuntimeError as error:
        return f"error: {error}"
    if result.adopt is not None:
        return f"adopt round {result.adopt.round}"
    return f"mean of {result.participants}"


def outer_steps(transport: Transport, codec: Codec, rounds: int) -> list[dict[str, bytes]]:
    """OuterSync with an injected non-default outer optimizer (Adam): every island must hold
    the same anchor and the same optimizer state after every round."""
    params = [torch.nn.Parameter(torch.zeros(NUMEL))]
    outer = OuterSync(params, transport, codec, ADAM, OuterHyperparams(inner_steps=1))
    transport.join([], SAME_GROUP)
    if isinstance(transport, SharedStateSource):
        transport.shared_state(outer.shared_state())
    seen = []
    for round in range(rounds):
        with torch.no_grad():
            params[0].add_(island_vector(transport.rank, round), alpha=0.01)
        outer.sync(island_weight(transport.rank, round, transport.num_islands))
        state = b"".join(t.numpy().tobytes() for _, t in sorted(outer.outer_state.items()))
        seen.append({"anchor": outer.anchor_N.numpy().tobytes(), "state": state})
    return seen


# --- the groups: each island runs the whole plan, in order, on one transport per entry -------

JOIN_CASES: list[tuple[str, list[list[int]], int | None]] = [
    # (name, the rounds each island holds (the first N lists are used), the newest common one)
    ("same lists", [[1, 2, 3]] * 3, 3),
    ("newest common round", [[1, 2, 3, 5], [2, 3, 4], [7, 3, 2]], 3),
    ("one island ahead", [[4, 5, 6], [4, 5], [3, 4, 5]], 5),
    ("nothing in common", [[1], [2], [3]], None),
    ("one island has none", [[1, 2], [], [1, 2]], None),
    ("nobody has any", [[], [], []], None),
]
OUTER_ROUNDS = 3
ADAM = adam_outer(lr=0.05, betas=(0.9, 0.99), eps=1e-8)

PLAN: list[tuple[str, Callable[..., Any], Codec, tuple[Any, ...]]] = [
    # (name, scenario, codec of the transport, scenario arguments after transport and codec)
    ("none", average_rounds, NoneCodec(), (RANDOM_ROUNDS + 1,)),
    ("join", join_cases, NoneCodec(), ([lists for _, lists, _ in JOIN_CASES],)),
    ("user codec", average_rounds, Fp16Codec(), (2,)),
    ("wrong round", average_on_wrong_round, NoneCodec(), ()),
    ("another model", join_with_another_model, NoneCodec(), ()),
    ("outer optimizer", outer_steps, NoneCodec(), (OUTER_ROUNDS,)),
    # A codec that decodes into a copy: grpc decodes the mean into the spent pseudo-gradient.
    ("outer steps int8", outer_steps, Int8Codec(block_size=64), (OUTER_ROUNDS,)),
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


GRPC_TOKEN = "conformance-token-0123456789"


def _grpc_island(ports: list[int], rank: int, num_islands: int, plan: list[Any]) -> dict[str, Any]:
    settings = GrpcTransportConfig(insecure=True, retry_s=30.0)
    transports = [
        GrpcTransport(
            dataclasses.replace(settings, address=f"127.0.0.1:{port}"),
            run_id="conformance",
            token=GRPC_TOKEN,
            codec=codec,
            numel=NUMEL,
            rank=rank,
            num_islands=num_islands,
        )
        for port, (_, _, codec, _) in zip(ports, plan, strict=True)
    ]
    try:
        return _run_plan(transports, plan)
    finally:
        for transport in transports:
            transport.close()


def _grpc_group(num_islands: int, plan: list[Any]) -> list[dict[str, Any]]:
    """One coordinator per plan entry in this process (bound to port 0: it reports its port,
    so nothing races for a free one), the islands in spawned processes."""
    # A round closes as soon as every island has reported; the deadline only matters to the
    # wrong-round scenario (its round closes without the islands that named another round),
    # and must not cut a slowly starting island out of the others.
    patient = RoundRules(
        run_id="conformance",
        rounds=100,
        islands=num_islands,
        min_islands=1,
        deadline_floor_s=60.0,
        deadline_ceiling_s=120.0,
    )
    hasty = dataclasses.replace(patient, deadline_floor_s=2.0, deadline_ceiling_s=10.0)
    settings = GrpcTransportConfig(listen="127.0.0.1:0", insecure=True)
    servers = []
    for name, _, codec, _ in plan:
        optimizer = (
            ADAM if name.startswith("outer") else SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
        )
        rules = hasty if name == "wrong round" else patient
        coordinator = Coordinator(rules, codec, optimizer, pinned=SAME_GROUP, state_dir=None)
        servers.append(CoordinatorServer(coordinator, settings, GRPC_TOKEN).start())
    try:
        results = spawn_children(
            _grpc_island,
            [([s.port for s in servers], rank, num_islands, plan) for rank in range(num_islands)],
            timeout_s=120,
        )
        hashes = {
            name: s.coordinator.state_sha256() for (name, *_), s in zip(plan, servers, strict=True)
        }
        for island in results:
            island["coordinator sha256"] = hashes
        return results
    finally:
        for server in servers:
            server.stop(grace_s=0.5)


def _collective_join(lists: list[list[int]], rank: int) -> int | None:
    return newest_common_round(lists)


def _own_newest(lists: list[list[int]], rank: int) -> int | None:
    # Islands of a transport that keeps the group's state resume from their own newest
    # checkpoint; the group's newer state, if any, comes next (shared_state).
    return max(lists[rank]) if lists[rank] else None


def _collective_wrong_round(messages: list[str], num_islands: int) -> None:
    for island, message in enumerate(messages):
        assert message.startswith("error: "), f"island {island} averaged across rounds: {message}"
        assert "disagree on the round" in message and "[0, 1" in message


def _coordinated_wrong_round(messages: list[str], num_islands: int) -> None:
    # The coordinator is at round 0: island 0's payload is averaged alone at the deadline; a
    # payload for another round never reaches a mean, its island adopts the group's state.
    assert messages[0] == "mean of 1", messages
    assert messages[1:] == ["adopt round 0"] * (num_islands - 1), messages


def _collective_another_model(messages: list[str | None], num_islands: int) -> None:
    for island, message in enumerate(messages):
        assert message is not None, f"island {island} joined a group running another model"
        assert "islands differ and cannot average together: model:" in message
        assert f"island {num_islands - 1} mlp-2x64" in message
        assert "island 0 gpt-4x128" in message
        assert "inner_steps" not in message  # only what differs is named


def _coordinated_another_model(messages: list[str | None], num_islands: int) -> None:
    # The coordinator's pinned fingerprint is the group's: only the odd island is refused, and
    # told which key differs, never the group's values.
    assert messages[:-1] == [None] * (num_islands - 1), messages
    refused = messages[-1]
    assert refused is not None and "differing keys: model" in refused, refused
    assert "gpt-4x128" not in refused and "inner_steps" not in refused


@dataclass(frozen=True)
class GroupKind:
    run: Callable[[int, list[Any]], list[dict[str, Any]]]
    """Run a plan on N islands; every island's {name: result}, in rank order."""
    wire_bytes: Callable[[Codec, int, int], tuple[int, int] | list[tuple[int, int]]]
    """(sent, received) bytes of one island per average, as the implementation documents; a
    sorted list of every island's pair where islands move different bytes (hivemind: one
    island, drawn at random, reduces a small vector)."""
    join_answer: Callable[[list[list[int]], int], int | None]
    """What join() returns on island `rank` given every island's checkpoint rounds."""
    wrong_round: Callable[[list[str], int], None]
    another_model: Callable[[list[str | None], int], None]
    reencodes_mean: bool = False
    """The mean travels encoded with the run's codec (a coordinator re-encodes it)."""


def _ring_bytes(codec: Codec, payload_bytes: int, num_islands: int) -> tuple[int, int]:
    ring = ring_allreduce_bytes(payload_bytes, num_islands)
    return ring, ring


def _torch_bytes(codec: Codec, payload_bytes: int, num_islands: int) -> tuple[int, int]:
    # Documented in diloco/transports/torch_distributed.py: fp32 is all-reduced (a ring),
    # other codecs are broadcast by each island (its payload reaches N - 1 peers).
    if codec.name == "none":
        return _ring_bytes(codec, payload_bytes, num_islands)
    return (num_islands - 1) * payload_bytes, (num_islands - 1) * payload_bytes


def _coordinator_bytes(codec: Codec, payload_bytes: int, num_islands: int) -> tuple[int, int]:
    # Each island uploads its payload and downloads the re-encoded mean (same size).
    return payload_bytes, payload_bytes


KINDS = {
    "local": GroupKind(
        _local_group,
        _ring_bytes,
        _collective_join,
        _collective_wrong_round,
        _collective_another_model,
    ),
    "torch": GroupKind(
        _torch_group,
        _torch_bytes,
        _collective_join,
        _collective_wrong_round,
        _collective_another_model,
    ),
    "grpc": GroupKind(
        _grpc_group,
        _coordinator_bytes,
        _own_newest,
        _coordinated_wrong_round,
        _coordinated_another_model,
        reencodes_mean=True,
    ),
}


def hivemind_optimizer(name: str) -> OuterOptimizer:
    """A plan entry's outer optimizer, with which hivemind islands serve their state (module
    level: the spawned islands unpickle it)."""
    return ADAM if name.startswith("outer") else SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


if importlib.util.find_spec("hivemind") is not None:  # the optional extra
    KINDS["hivemind"] = GroupKind(
        functools.partial(run_hivemind_group, numel=NUMEL, optimizer_for=hivemind_optimizer),
        hivemind_wire_bytes,
        _own_newest,
        hivemind_wrong_round,
        hivemind_another_model,
        reencodes_mean=True,
    )


@dataclass(frozen=True)
class Group:
    kind: GroupKind
    num_islands: int
    results: list[dict[str, Any]]
    """What each island's scenarios returned, by plan name."""

    def seen(self, name: str) -> list[Any]:
        return [island[name] for island in self.results]

    def expected_mean(self, codec: Codec, round: int) -> torch.Tensor:
        mean = expected_mean(codec, round, self.num_islands)
        if self.kind.reencodes_mean:
            mean = codec.decode(codec.encode(mean), NUMEL)
        return mean


@pytest.fixture(
    scope="module",
    params=[
        # hivemind groups take a minute or two to form, and the 3-island groups of the kinds
        # that spawn processes cost half a minute each: make test-all runs them
        pytest.param(
            (kind, n),
            marks=[pytest.mark.slow] if kind == "hivemind" or (n == 3 and kind != "local") else [],
        )
        for kind in KINDS
        for n in (2, 3)
    ],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def group(request: pytest.FixtureRequest) -> Group:
    """A group of N islands that has run PLAN (once per group: spawning costs seconds)."""
    name, num_islands = request.param
    kind = KINDS[name]
    return Group(kind, num_islands, kind.run(num_islands, PLAN))


def _mean(seen: dict[str, Any]) -> torch.Tensor:
    return torch.frombuffer(bytearray(seen["mean"]), dtype=torch.float32)


def _assert_bytes(group: Group, codec: Codec, payload_bytes: int, one_round: list[Any]) -> None:
    """Every island's (bytes_sent, bytes_received) in one round are what the kind documents."""
    expected = group.kind.wire_bytes(codec, payload_bytes, group.num_islands)
    pairs = [(seen["bytes_sent"], seen["bytes_received"]) for seen in one_round]
    if isinstance(expected, list):
        assert sorted(pairs) == expected
    else:
        assert pairs == [expected] * group.num_islands


# --- the suite -----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_mean_is_the_weighted_mean(group: Group) -> None:
    """Each round's mean is the token-weighted mean of the islands' vectors: within fp32
    rounding for random data (a transport may sum in another order), bit-exact for data whose
    weighted sums are exact in fp32 whatever the order."""
    codec = NoneCodec()
    for island, rounds in enumerate(group.seen("none")):
        assert len(rounds) == RANDOM_ROUNDS + 1
        for round, seen in enumerate(rounds):
            assert seen["dtype"] == "torch.float32"
            expected = group.expected_mean(codec, round)
            got = _mean(seen)
            if round < RANDOM_ROUNDS:
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(got, expected), f"island {island} round {round} is not exact"


@pytest.mark.timeout(180)
def test_mean_is_bit_identical_on_every_island(group: Group) -> None:
    """Every island receives the same bits in every round (the invariant behind identical
    params_sha256 across islands)."""
    for round in range(RANDOM_ROUNDS + 1):
        means = {island_rounds[round]["mean"] for island_rounds in group.seen("none")}
        assert len(means) == 1, f"round {round}: {len(means)} different means across islands"


@pytest.mark.timeout(180)
def test_participants_and_bytes(group: Group) -> None:
    """participants is N; bytes_sent and bytes_received are what the implementation documents
    for the fp32 payload (header included), every round."""
    codec = NoneCodec()
    payload_bytes = codec.payload_bytes(NUMEL)
    for rounds in group.seen("none"):
        for seen in rounds:
            assert seen["payload_bytes"] == payload_bytes
            assert seen["participants"] == group.num_islands
    for round in range(RANDOM_ROUNDS + 1):
        _assert_bytes(group, codec, payload_bytes, [r[round] for r in group.seen("none")])


@pytest.mark.timeout(180)
def test_join_answers_the_round_to_resume_from(group: Group) -> None:
    """join() returns the round each island resumes from, as its kind documents: the newest
    round every island holds (collective kinds) or the island's own newest (kinds that keep
    the group's state, which the island then takes), None for a fresh start."""
    answers = group.seen("join")
    for index, (name, lists, _) in enumerate(JOIN_CASES):
        lists = lists[: group.num_islands]
        got = [island_answers[index] for island_answers in answers]
        expected = [group.kind.join_answer(lists, rank) for rank in range(group.num_islands)]
        assert got == expected, f"{name}: {lists} -> {got}"


@pytest.mark.timeout(180)
def test_a_mean_never_mixes_rounds(group: Group) -> None:
    """An average where islands name different rounds is refused or answered per round."""
    group.kind.wrong_round(group.seen("wrong round"), group.num_islands)


@pytest.mark.timeout(180)
def test_user_codec_without_inheritance(group: Group) -> None:
    """A codec defined here (fp16, no header, no base class) travels through the transport's
    generic path: the mean is weighted_mean of the decoded payloads in rank order, bit for bit
    (re-encoded by the codec where the kind sends the mean encoded), identical everywhere, with
    the documented byte counts."""
    codec = Fp16Codec()
    seen_by_island = group.seen("user codec")
    for island, rounds in enumerate(seen_by_island):
        for round, seen in enumerate(rounds):
            assert seen["payload_bytes"] == 2 * NUMEL
            expected = group.expected_mean(codec, round)
            assert torch.equal(_mean(seen), expected), f"island {island} round {round}"
            assert seen["participants"] == group.num_islands
    for round in range(len(seen_by_island[0])):
        _assert_bytes(group, codec, codec.payload_bytes(NUMEL), [r[round] for r in seen_by_island])


@pytest.mark.timeout(180)
def test_islands_with_another_model_are_refused_at_join(group: Group) -> None:
    """join() compares fingerprints: an island whose entry differs is refused, naming it."""
    group.kind.another_model(group.seen("another model"), group.num_islands)


@pytest.mark.timeout(180)
def test_an_injected_outer_optimizer_gives_the_same_anchor_everywhere(group: Group) -> None:
    """OuterSync with Adam as the outer optimizer: after every round every island holds the
    same anchor and the same Adam state, bit for bit, and both follow a reference computed
    from the expected means with the same optimizer; a coordinator that keeps the group's
    state holds the same anchor too (its optimizer is the injected one)."""
    _assert_outer_steps(group, "outer optimizer", NoneCodec())


@pytest.mark.timeout(180)
def test_outer_steps_with_a_lossy_codec_agree_everywhere(group: Group) -> None:
    """The same with int8 payloads: the reference averages the decoded payloads (and decodes
    the re-encoded mean, where a coordinator sends one). grpc decodes each island's mean into
    its spent pseudo-gradient (DecodesMeanInto), the other kinds into a new vector."""
    _assert_outer_steps(group, "outer steps int8", Int8Codec(block_size=64))


def _assert_outer_steps(group: Group, name: str, codec: Codec) -> None:
    per_island = group.seen(name)
    anchor = torch.zeros(NUMEL)
    state = ADAM.init_state(anchor)
    for round in range(OUTER_ROUNDS):
        assert len({island[round]["anchor"] for island in per_island}) == 1, f"round {round}"
        assert len({island[round]["state"] for island in per_island}) == 1, f"round {round}"
        # Each island moved by +0.01 v: its pseudo-gradient is -0.01 v.
        deltas = [
            codec.decode(codec.encode(-0.01 * island_vector(rank, round)), NUMEL)
            for rank in range(group.num_islands)
        ]
        weights = [island_weight(r, round, group.num_islands) for r in range(group.num_islands)]
        mean = weighted_mean(deltas, weights)
        if group.kind.reencodes_mean:
            mean = codec.decode(codec.encode(mean), NUMEL)
        ADAM.step_(anchor, mean, state, round)
        got = torch.frombuffer(bytearray(per_island[0][round]["anchor"]), dtype=torch.float32)
        torch.testing.assert_close(got, anchor, rtol=1e-5, atol=1e-6)
    final = torch.frombuffer(bytearray(per_island[0][-1]["anchor"]), dtype=torch.float32)
    coordinator = group.results[0].get("coordinator sha256", {}).get(name)
    if coordinator is not None:
        assert coordinator == params_sha256(final)
