"""Issue 12, items 1-8: what a token holder can send to the grpc coordinator, tried on loopback.

The coordinator and two honest islands (threads, real grpc clients) run in this process; the
attacker is another process (`grpc_attacker.py`) that holds the run token and makes raw grpc
calls, with the outcome of each (status code, details) sent back. A token holder is a
semi-trusted site: every call it makes is refused or harmless, the honest islands' rounds
close with their own payloads, and the shared state never moves by anything it sent.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_attacker

from diloco.codecs import build_codec
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.grpc.client import GrpcTransport
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.coordinator import Coordinator
from diloco.transports.grpc.hosting import read_fingerprint_file
from diloco.transports.grpc.rounds import RoundRules
from diloco.transports.grpc.service import CoordinatorServer

pytestmark = pytest.mark.timeout(120)

NUMEL = 10_000
TOKEN = "attack-test-token-0123456789"
RUN = "run"
IDLE_S = 1.0
"""transport.grpc.stream_idle_s of these coordinators."""
CUT_WITHIN_S = 8 * IDLE_S
"""The attacker's own deadline on a stream: a stream the coordinator did not cut by then ends
DEADLINE_EXCEEDED instead of CANCELLED, and the test fails."""
ATTACKER = 2
SGD = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


def start_weights() -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))


FINGERPRINT = {
    "model": "m1",
    "parameters": str(NUMEL),
    "initial weights": params_sha256(start_weights())[:16],
}


# --- the coordinator and the honest islands (this process) -------------------------------------


@dataclass
class Group:
    coordinator: Coordinator
    server: CoordinatorServer
    address: str
    islands: list[GrpcTransport] = field(default_factory=list)
    anchor: torch.Tensor = field(default_factory=start_weights)
    momentum: torch.Tensor = field(default_factory=lambda: torch.zeros(NUMEL))

    def island(self, rank: int, tmp_path: Path) -> GrpcTransport:
        settings = GrpcTransportConfig(address=self.address, insecure=True, retry_s=20)
        transport = GrpcTransport(
            settings,
            run_id=RUN,
            token=TOKEN,
            codec=self.coordinator.codec,
            numel=NUMEL,
            rank=rank,
            num_islands=self.coordinator.rules.islands,
            session_file=tmp_path / f"island-{rank}" / "grpc-session",
        )
        transport.join([], FINGERPRINT)
        self.islands.append(transport)
        return transport

    def seed(self) -> None:
        state = SharedState(0, self.anchor.clone(), {"momentum": self.momentum.clone()})
        assert self.islands[0].shared_state(state) is None

    def honest_round(self, ranks: list[int], timeout_s: float = 60) -> list[Any]:
        """One round of the honest islands (threads); their answers, checked against the
        weighted mean of their own payloads only."""
        round, sha = self.coordinator.round, params_sha256(self.anchor)
        deltas = [honest_delta(rank, round) for rank in ranks]
        codec = self.coordinator.codec
        results: dict[int, Any] = {}

        def run(index: int) -> None:
            island = self.islands[ranks[index]]
            results[index] = island.average(codec.encode(deltas[index]), 100.0, round, sha)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(ranks))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout_s)
        assert len(results) == len(ranks), "an honest island's round did not finish"
        mean = torch.stack(deltas).mean(dim=0)
        for result in results.values():
            assert result.adopt is None and result.participants == len(ranks)
            assert torch.allclose(result.mean, mean, atol=1e-6)
        SGD.step_(self.anchor, results[0].mean, {"momentum": self.momentum}, round)
        assert self.coordinator.state_sha256() == params_sha256(self.anchor)
        return [results[i] for i in range(len(ranks))]

    def stop(self) -> None:
        for island in self.islands:
            island.close()
        self.server.stop(0)


def honest_delta(rank: int, round: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * round + rank)) * 1e-2


@pytest.fixture
def make_group(tmp_path: Path) -> Iterator[Callable[..., Group]]:
    """`make_group(islands=3, seeded=True, pinned=...)`: a coordinator with islands 0 and 1
    joined (and the state seeded), rank 2 free for the attacker."""
    made: list[Group] = []

    def make(islands: int = 3, seeded: bool = True, pinned: dict[str, str] | None = None) -> Group:
        rules = RoundRules(
            run_id=RUN,
            rounds=20,
            islands=islands,
            min_islands=2,
            deadline_floor_s=1.0,
            deadline_ceiling_s=5.0,
        )
        coordinator = Coordinator(
            rules,
            build_codec("none"),
            SGD,
            pinned=FINGERPRINT if pinned is None else pinned,
            state_dir=tmp_path / "coordinator",
        )
        listen = GrpcTransportConfig(address="127.0.0.1:0", insecure=True, stream_idle_s=IDLE_S)
        server = CoordinatorServer(coordinator, listen, TOKEN).start()
        group = Group(coordinator, server, f"127.0.0.1:{server.port}")
        made.append(group)
        if seeded:
            group.island(0, tmp_path)
            group.island(1, tmp_path)
            group.seed()
        return group

    yield make
    for group in made:
        group.stop()


def attack(
    address: str,
    steps: list[tuple[str, dict[str, Any]]],
    fingerprint: dict[str, str] = FINGERPRINT,
    timeout_s: float = 60,
) -> dict[str, Any]:
    """Run `steps` in an attacker process (tests/integration/grpc_attacker.py) that holds the
    run token and joins as rank ATTACKER; the outcome of each step, by step name."""
    payload = build_codec("none").encode(torch.zeros(NUMEL)).numpy().tobytes()
    plan = {
        "address": address,
        "token": TOKEN,
        "run_id": RUN,
        "numel": NUMEL,
        "rank": ATTACKER,
        "payload_b64": base64.b64encode(payload).decode(),
        "fingerprint": fingerprint,
        "stream_deadline_s": CUT_WITHIN_S,
        "steps": steps,
    }
    return run_attacker(plan, timeout_s)


# --- item 1: NaN / inf weights, rounds and ranks out of range ----------------------------------


BAD_HEADERS = {
    "nan weight": ({"weight": float("nan")}, "weight must be finite"),
    "inf weight": ({"weight": float("inf")}, "weight must be finite"),
    "-inf weight": ({"weight": -float("inf")}, "weight must be finite"),
    "negative weight": ({"weight": -5.0}, "weight must be finite"),
    "huge weight": ({"weight": 1e300}, "weight must be finite"),
    "negative round": ({"round": -1}, "round -1 is outside"),
    "huge round": ({"round": 2**62}, "is outside [0, 20]"),
    "other rank": ({"rank": 0}, "is not the caller's"),
    "rank out of range": ({"rank": 7}, "is not the caller's"),
    "negative payload_bytes": ({"payload_bytes": -1}, "payload_bytes must be >= 0"),
    "sha with a newline": ({"params_sha256": "a" * 64 + "\n"}, "sha256 hex digest"),
}


def test_nan_inf_and_out_of_range_headers_are_refused_and_the_round_closes(
    make_group: Callable[..., Group],
) -> None:
    """Item 1: `nan <= 0` is False, so a NaN weight entered the round, its mean was NaN, its
    encoding raised in every close and the run stopped. Each is refused now, before it
    touches the round, and the honest islands' round closes with their mean."""
    group = make_group()
    before = group.coordinator.state_sha256()
    plan: list[tuple[str, dict[str, Any]]] = [("join", {})]
    plan += [
        (f"average#{name}", {"header": h, "body": "zeros"}) for name, (h, _) in BAD_HEADERS.items()
    ]
    outcomes = attack(group.address, plan)
    assert outcomes["join"] == ["OK", ""]
    for name, (_, fragment) in BAD_HEADERS.items():
        code, details, _ = outcomes[f"average#{name}"]
        assert code == "INVALID_ARGUMENT" and fragment in details, (name, code, details)
    assert group.coordinator.stats.refused_payloads == len(BAD_HEADERS)
    assert group.coordinator.state_sha256() == before
    # The attacker joined rank 2 but never contributed: the round closes at its deadline
    # with the honest islands' payloads only (and the next one at once).
    group.honest_round([0, 1])
    group.honest_round([0, 1])
    assert group.coordinator.stats.participants == [2, 2]
    assert group.coordinator.stats.dropped_payloads == 0


# --- item 2: idle, empty, slow and flooding streams ----------------------------------------------


def test_idle_empty_and_slow_streams_are_cut_within_the_idle_time(
    make_group: Callable[..., Group],
) -> None:
    """Item 2: an Average stream that stops after its header, one of empty chunks and one of a
    byte at a time were read forever. Each is cancelled by the coordinator (CANCELLED) before
    the attacker's own deadline of CUT_WITHIN_S (8x transport.grpc.stream_idle_s)."""
    group = make_group()
    header = {"round": 0, "params_sha256": group.coordinator.state_sha256()}
    plan = [
        ("join", {}),
        ("average#silent", {"header": None}),
        ("average#idle", {"header": header, "body": "idle"}),
        ("average#empty", {"header": header, "body": "empty"}),
        ("average#slow", {"header": header, "body": "slow"}),
    ]
    outcomes = attack(group.address, plan)
    for name in ("silent", "idle", "empty", "slow"):
        code, details, seconds = outcomes[f"average#{name}"]
        assert code == "CANCELLED", (name, code, details, seconds)
    assert group.server.service.watchdog.cancelled == 4
    assert group.coordinator.stats.refused_payloads == 0
    group.honest_round([0, 1])


def test_a_flood_of_streams_is_bounded_and_does_not_starve_the_islands(
    make_group: Callable[..., Group],
) -> None:
    """Item 2: 32 idle streams at once froze the group. Per caller, 2 Average calls are held
    at a time (the rest are refused at once, RESOURCE_EXHAUSTED, and retried by a real
    island); without a session none is read at all. Honest rounds close meanwhile."""
    group = make_group()
    header = {"round": 0, "params_sha256": group.coordinator.state_sha256()}
    plan = [
        ("averages#no session", {"count": 32, "header": header, "session": ""}),
        ("join", {}),
        ("averages#session", {"count": 32, "waves": 4, "header": header}),
    ]
    result: dict[str, Any] = {}
    attacker = threading.Thread(target=lambda: result.update(attack(group.address, plan)))
    attacker.start()
    limits = group.server.service.limits
    deadline = time.monotonic() + 60
    while limits.in_flight("Average", ATTACKER) == 0 and attacker.is_alive():
        assert time.monotonic() < deadline, "the flood did not start"
        time.sleep(0.01)
    group.honest_round([0, 1])  # during the flood
    group.honest_round([0, 1])
    attacker.join(90)
    assert set(result["averages#no session"]) == {"UNAUTHENTICATED"}
    codes = result["averages#session"]
    # OK: a stream opened after round 0 closed is a late payload, answered with that round's
    # mean and dropped (the attacker is a member: harmless).
    assert len(codes) == 4 * 32 and set(codes) <= {"CANCELLED", "RESOURCE_EXHAUSTED", "OK"}
    assert codes.count("RESOURCE_EXHAUSTED") >= 32, codes
    assert limits.peak[("Average", ATTACKER)] == 2
    assert group.coordinator.stats.participants == [2, 2]


# --- item 3: PutState from a caller that never joined, or of another size ------------------------


def test_put_state_needs_a_joined_island_and_the_groups_model(
    make_group: Callable[..., Group], tmp_path: Path
) -> None:
    """Item 3: before any island, a PutState of 16 values seeded the group (and with the right
    size, every island would have adopted the attacker's weights)."""
    group = make_group(seeded=False)
    plan: list[tuple[str, dict[str, Any]]] = [
        ("put_state#unjoined", {"numel": 16, "send": 32, "with_session": False}),
        ("join", {}),
        ("put_state#16 values", {"numel": 16, "send": 32}),
        ("put_state#forged weights", {"numel": NUMEL, "send": 2 * NUMEL, "fill": 3.0}),
        ("put_state#future round", {"numel": NUMEL, "send": 2 * NUMEL, "round": 10**9}),
    ]
    outcomes = attack(group.address, plan)
    assert outcomes["put_state#unjoined"][0] == "UNAUTHENTICATED"
    assert outcomes["put_state#16 values"] == [
        "INVALID_ARGUMENT",
        f"state refused: the state has 16 parameters, the group's model {NUMEL}",
    ]
    assert outcomes["put_state#forged weights"][0] == "INVALID_ARGUMENT"
    assert "not the group's initial weights" in outcomes["put_state#forged weights"][1]
    assert outcomes["put_state#future round"][0] == "INVALID_ARGUMENT"
    assert "round 1000000000 is outside" in outcomes["put_state#future round"][1]
    assert not group.coordinator.has_state()
    # The real island seeds the group with its own state, and the round runs.
    group.island(0, tmp_path)
    group.island(1, tmp_path)
    group.seed()
    assert group.coordinator.state_sha256() == params_sha256(start_weights())
    group.honest_round([0, 1])


# --- item 4: stalled GetState readers -----------------------------------------------------------


def test_stalled_state_readers_are_cut_and_hold_no_copy_of_the_state(
    make_group: Callable[..., Group], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 4: each GetState reader that stopped reading held a full copy of the state. Now a
    download is read from the keeper's one state chunk by chunk (a stalled reader holds the
    chunk in flight), two at a time per caller, and a stalled one is cut after the idle time."""
    group = make_group()
    keeper = group.coordinator.keeper
    chunks_read: list[int] = []
    read_chunks = keeper.read_chunks

    def counting(generation: int) -> Iterator[bytes]:
        chunks_read.append(0)
        index = len(chunks_read) - 1
        for piece in read_chunks(generation):
            chunks_read[index] += 1
            yield piece

    monkeypatch.setattr(keeper, "read_chunks", counting)
    # A state of several chunks (anchor + momentum of 4M fp32: 8 chunks of 4 MiB).
    with group.coordinator._cond:
        big = 4 << 20
        keeper.state = SharedState(0, torch.zeros(big), {"momentum": torch.zeros(big)})
        keeper.generation += 1
        keeper.sha = params_sha256(keeper.state.anchor)
    plan = [("join", {}), ("stalled_get_states", {"count": 6, "stall_s": 4 * IDLE_S})]
    codes = attack(group.address, plan)["stalled_get_states"]
    assert sorted(codes) == ["CANCELLED"] * 2 + ["RESOURCE_EXHAUSTED"] * 4, codes
    assert len(chunks_read) == 2
    assert all(count <= 3 for count in chunks_read), chunks_read  # of 8
    assert group.server.service.watchdog.cancelled == 2


# --- item 5: joins that replay the group's settings, or invent them ------------------------------


def test_a_live_rank_cannot_be_taken_and_refusals_name_keys_only(
    make_group: Callable[..., Group], caplog: pytest.LogCaptureFixture
) -> None:
    """Item 5: a refused join disclosed the group's fingerprint values, and replaying them let
    a token holder join as any rank."""
    group = make_group(pinned={})
    plan: list[tuple[str, dict[str, Any]]] = [
        ("join#other model", {"rank": 2, "fingerprint": {**FINGERPRINT, "model": "mine"}}),
        ("join#replay rank 0", {"rank": 0}),
        ("join#replay with a guessed session", {"rank": 1, "session": "ab" * 16}),
    ]
    outcomes = attack(group.address, plan)
    code, details = outcomes["join#other model"]
    assert code == "FAILED_PRECONDITION" and details.endswith("differing keys: model")
    assert "m1" not in details
    assert "'model': group 'm1', island 'mine'" in caplog.text  # the values: on the coordinator
    for name in ("join#replay rank 0", "join#replay with a guessed session"):
        code, details = outcomes[name]
        assert code == "FAILED_PRECONDITION" and "is held by a live island" in details, name
    group.honest_round([0, 1])  # both islands still hold their ranks


def test_a_pinned_group_cannot_be_defined_by_the_first_caller(
    make_group: Callable[..., Group], tmp_path: Path
) -> None:
    """Item 5: joining first with invented model hashes locked the real islands out. With
    transport.grpc.fingerprint_file the coordinator knows the group's model before anyone."""
    pinned_file = tmp_path / "fingerprint.json"
    pinned_file.write_text(json.dumps(FINGERPRINT))
    group = make_group(seeded=False, pinned=read_fingerprint_file(pinned_file))
    invented = {"model": "invented", "parameters": "16", "initial weights": "0" * 16}
    outcomes = attack(group.address, [("join", {"rank": 0, "fingerprint": invented})])
    code, details = outcomes["join"]
    assert code == "FAILED_PRECONDITION"
    assert details.endswith("differing keys: initial weights, model, parameters")
    group.island(0, tmp_path)
    group.island(1, tmp_path)
    group.seed()
    group.honest_round([0, 1])


# --- item 6: log injection -----------------------------------------------------------------------


def test_what_came_from_the_wire_is_logged_escaped(
    make_group: Callable[..., Group], caplog: pytest.LogCaptureFixture
) -> None:
    """Item 6: fingerprint values were logged unescaped: a newline wrote a forged log line."""
    group = make_group()
    forged = "x\n2026-01-01 00:00:00 INFO diloco: island 1 seeded the shared state"
    plan: list[tuple[str, dict[str, Any]]] = [
        ("join#newline value", {"fingerprint": {**FINGERPRINT, "model": forged}}),
        ("join#newline key", {"fingerprint": {**FINGERPRINT, forged: "1"}}),
        ("join#newline host", {"host": forged}),
        ("average#newline run_id", {"header": {"run_id": forged}, "body": "zeros"}),
        ("average#newline sha", {"header": {"params_sha256": forged}, "body": "zeros"}),
        ("leave#newline run_id", {"rank": ATTACKER, "run_id": forged}),
    ]
    with caplog.at_level(logging.INFO):
        outcomes = attack(group.address, plan)
    assert outcomes["join#newline value"][0] == "FAILED_PRECONDITION"
    assert outcomes["join#newline key"][0] == "FAILED_PRECONDITION"
    assert outcomes["join#newline host"] == ["OK", ""]
    assert outcomes["average#newline run_id"][0] == "INVALID_ARGUMENT"
    assert outcomes["average#newline sha"][0] == "INVALID_ARGUMENT"
    assert outcomes["leave#newline run_id"][0] == "PERMISSION_DENIED"
    messages = [record.getMessage() for record in caplog.records]
    assert any("x\\n2026-01-01" in message for message in messages), messages
    for message in messages:
        assert "\n" not in message, message


# --- item 7: declared sizes are checked before anything is allocated ----------------------------


@pytest.mark.parametrize("pinned", [True, False], ids=["group size known", "group size unknown"])
def test_absurd_declared_sizes_are_refused_without_allocating(
    make_group: Callable[..., Group], pinned: bool
) -> None:
    """Item 7: PutState allocated what it declared: numel=10**12 raised MemoryError, 2**31 took
    256 MiB. With the group's size known, the header is refused before a byte is read; unknown
    (a fingerprint without `parameters`), the buffer grows only with the bytes that came."""
    fingerprint = FINGERPRINT if pinned else {"model": "m1"}
    group = make_group(seeded=False, pinned=fingerprint)
    join = ("join", {"fingerprint": fingerprint})
    plan = [join, ("put_state#1e12", {"numel": 10**12, "send": 1000})]
    plan += [("put_state#2^31", {"numel": 2**31, "send": 1000})]
    outcomes = attack(group.address, plan)
    for name, numel in (("put_state#1e12", 10**12), ("put_state#2^31", 2**31)):
        code, details = outcomes[name]
        assert code == "INVALID_ARGUMENT", (name, code, details)
        if pinned:
            assert f"the state has {numel} parameters, the group's model {NUMEL}" in details
        else:
            assert "bytes arrived of the" in details and "(truncated)" in details
    assert not group.coordinator.has_state()


# --- item 8: Leave (and GetState) for another rank ---------------------------------------------


def test_a_caller_cannot_make_another_rank_leave(make_group: Callable[..., Group]) -> None:
    """Item 8: Leave(rank=1) from another caller returned OK while island 1 was alive, and
    island 1's next payload was dropped as late."""
    group = make_group()
    plan = [
        ("leave#no session", {"rank": 1, "as_rank": 1}),
        ("join", {}),
        ("leave#other rank", {"rank": 1}),
        ("leave#other rank's metadata", {"rank": 1, "as_rank": 1}),
        ("get_state_for#other rank", {"rank": 1}),
    ]
    outcomes = attack(group.address, plan)
    assert outcomes["leave#no session"][0] == "UNAUTHENTICATED"
    assert outcomes["leave#other rank"] == [
        "PERMISSION_DENIED",
        "island 2 may call Leave for itself only, in its own run",
    ]
    assert outcomes["leave#other rank's metadata"][0] == "UNAUTHENTICATED"
    assert outcomes["get_state_for#other rank"][0] == "PERMISSION_DENIED"
    assert group.server.service.refused_calls == 4  # counted in the summary's refused_calls
    assert group.coordinator.membership.members[1].active
    results = group.honest_round([0, 1])
    assert not any(result.participants != 2 for result in results)
    assert group.coordinator.stats.late_payloads == 0
