"""`Coordinator`, the grpc coordinator's rules, driven by threads and a hand-moved clock.

No grpc and no sockets: each island is a thread calling `submit`, which blocks until its
round closes; the deadline thread is the test calling `tick` after moving the clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from diloco.aggregate import weighted_mean
from diloco.codecs import HEADER_BYTES, Codec, build_codec
from diloco.outer.nesterov import nesterov_step_
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.base import GroupMismatchError
from diloco.transports.grpc.coordinator import Coordinator, NotAuthorized, RoundAnswer
from diloco.transports.grpc.membership import RankHeld
from diloco.transports.grpc.rounds import NotReady, RefusedPayload, RoundRules

pytestmark = pytest.mark.timeout(30)

NUMEL = 40
FINGERPRINT = {"model.shapes": "abc", "outer.lr": "0.7"}
PINNED = {"model.shapes": "abc"}
JOIN_S = 5.0  # a bug must fail the test, never hang the suite
SGD = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class PickyCodec:
    """The `none` codec, except that it cannot encode values above 1e30 (as a lossy codec
    may fail on a mean it cannot represent): the failure `combine` must survive."""

    name = "none"

    def __init__(self) -> None:
        self._inner = build_codec("none")

    def encode(self, x_N: torch.Tensor) -> torch.Tensor:
        if float(x_N.abs().max()) > 1e30:
            raise ValueError("a value beyond this codec's range")
        return self._inner.encode(x_N)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return self._inner.decode(payload, numel)

    def payload_bytes(self, numel: int) -> int:
        return self._inner.payload_bytes(numel)


def make_rules(**overrides: Any) -> RoundRules:
    rules: dict[str, Any] = dict(
        run_id="run-a",
        rounds=10,
        islands=3,
        min_islands=2,
        deadline_floor_s=10.0,
        deadline_ceiling_s=100.0,
        deadline_slack=2.0,
    )
    rules.update(overrides)
    return RoundRules(**rules)


def initial_state() -> SharedState:
    generator = torch.Generator().manual_seed(0)
    return SharedState(0, torch.randn(NUMEL, generator=generator), {"momentum": torch.zeros(NUMEL)})


def deltas_for(round: int, islands: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + round)
    return [torch.randn(NUMEL, generator=generator) * (rank + 1) for rank in range(islands)]


def new_coordinator(
    codec: Codec | None = None,
    state_dir: Path | None = None,
    clock: Callable[[], float] | None = None,
    pinned: dict[str, str] | None = None,
    **rules: Any,
) -> Coordinator:
    return Coordinator(
        make_rules(**rules),
        codec or build_codec("none"),
        SGD,
        pinned=PINNED if pinned is None else pinned,
        state_dir=state_dir,
        clock=clock or FakeClock(),
    )


def make_group(
    codec: Codec | None = None,
    state_dir: Path | None = None,
    clock: Callable[[], float] | None = None,
    **rules: Any,
) -> tuple[Coordinator, dict[int, str]]:
    """A coordinator every island has joined and island 0 has seeded; the islands' sessions."""
    coordinator = new_coordinator(codec, state_dir, clock, **rules)
    sessions = {
        rank: coordinator.join(rank, "run-a", FINGERPRINT, "", f"host-{rank}")[2]
        for rank in range(coordinator.rules.islands)
    }
    assert coordinator.seed(0, initial_state())
    return coordinator, sessions


def state_of(coordinator: Coordinator) -> SharedState:
    coordinator.flush()
    state = coordinator.keeper.state
    assert state is not None
    return state


def momentum_of(state: SharedState) -> torch.Tensor:
    return state.outer_state["momentum"]


class Submitter:
    """submit() from one thread per island: it blocks until the round closes."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.threads: dict[int, threading.Thread] = {}
        self.answers: dict[int, RoundAnswer] = {}
        self.errors: dict[int, BaseException] = {}

    def start(self, rank: int, round: int, sha: str, delta: torch.Tensor, weight: float) -> None:
        def target() -> None:
            try:
                self.answers[rank] = self.coordinator.submit(rank, round, weight, sha, delta)
            except BaseException as error:  # re-raised in the test's thread by join()
                self.errors[rank] = error

        thread = threading.Thread(target=target, daemon=True)
        self.threads[rank] = thread
        thread.start()

    def join(self) -> dict[int, RoundAnswer]:
        for thread in self.threads.values():
            thread.join(JOIN_S)
            if thread.is_alive():
                self.coordinator.stop()  # releases the blocked threads before the test fails
                raise AssertionError("submit() did not return")
        if self.errors:
            raise next(iter(self.errors.values()))
        return self.answers


def reported(coordinator: Coordinator) -> int:
    """Payloads the open round holds (read under the coordinator's lock)."""
    with coordinator._cond:
        return len(coordinator.closer.open.pending)


def wait_until(condition: Callable[[], bool], timeout_s: float = JOIN_S) -> None:
    limit = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < limit, "condition not reached"
        time.sleep(0.002)


def run_round(
    coordinator: Coordinator, ranks: list[int], deltas: list[torch.Tensor], weights: list[float]
) -> dict[int, RoundAnswer]:
    round, sha = coordinator.round, coordinator.state_sha256()
    submitter = Submitter(coordinator)
    for rank in ranks:
        submitter.start(rank, round, sha, deltas[rank], weights[rank])
    return submitter.join()


def run_round_at_deadline(
    coordinator: Coordinator, clock: FakeClock, ranks: list[int]
) -> dict[int, RoundAnswer]:
    """A round that only `ranks` report: it closes when the clock passes its deadline."""
    round, sha = coordinator.round, coordinator.state_sha256()
    submitter = Submitter(coordinator)
    for rank in ranks:
        submitter.start(rank, round, sha, deltas_for(round)[rank], 1.0)
    wait_until(lambda: reported(coordinator) == len(ranks))
    clock.advance(coordinator.closer.deadline.seconds())
    coordinator.tick()
    return submitter.join()


def stepped(anchor: torch.Tensor, momentum: torch.Tensor, mean: torch.Tensor) -> None:
    nesterov_step_(anchor, mean, momentum, lr=0.7, mu=0.9, nesterov=True)


# -- join and sessions ------------------------------------------------------------------------


def test_join_returns_the_round_whether_the_group_has_state_and_a_session() -> None:
    coordinator = new_coordinator()
    round, has_state, session = coordinator.join(0, "run-a", FINGERPRINT, "", "h")
    assert (round, has_state) == (0, False) and len(session) == 32
    assert coordinator.seed(0, initial_state())
    state_five = SharedState(5, torch.ones(NUMEL), {"momentum": torch.ones(NUMEL)})
    assert not coordinator.seed(0, state_five)
    round, has_state, other = coordinator.join(1, "run-a", FINGERPRINT, "", "h")
    assert (round, has_state) == (0, True) and other != session
    assert coordinator.active_islands() == 2


def test_join_refuses_another_run_id() -> None:
    coordinator = new_coordinator()
    with pytest.raises(GroupMismatchError, match="transport.run_id differs.*'run-b'"):
        coordinator.join(0, "run-b", FINGERPRINT, "", "h")
    assert coordinator.active_islands() == 0


@pytest.mark.parametrize("rank", [-1, 3, 2**31 - 1])
def test_join_refuses_a_rank_out_of_range(rank: int) -> None:
    coordinator = new_coordinator()
    with pytest.raises(GroupMismatchError, match=rf"rank {rank} is outside \[0, "):
        coordinator.join(rank, "run-a", FINGERPRINT, "", "h")


def test_join_refuses_a_differing_fingerprint_naming_keys_not_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Changed on purpose (issue 12, item 5): the caller learns which keys differ, never the
    group's values; the coordinator's log has both, escaped."""
    coordinator = new_coordinator(pinned={})
    coordinator.join(0, "run-a", FINGERPRINT, "", "h")
    with pytest.raises(GroupMismatchError, match="differing keys: outer.lr$") as info:
        coordinator.join(1, "run-a", {**FINGERPRINT, "outer.lr": "0.5"}, "", "h")
    assert "0.7" not in str(info.value) and "0.5" not in str(info.value)
    assert "model.shapes" not in str(info.value)
    assert "'outer.lr': group '0.7', island '0.5'" in caplog.text
    with pytest.raises(GroupMismatchError, match="differing keys: model.shapes$") as info:
        coordinator.join(2, "run-a", {"outer.lr": "0.7"}, "", "h")
    assert "abc" not in str(info.value)
    assert coordinator.active_islands() == 1


def test_join_refuses_a_fingerprint_that_differs_from_the_coordinator_settings() -> None:
    coordinator = new_coordinator()
    with pytest.raises(GroupMismatchError, match="differing keys: model.shapes") as info:
        coordinator.join(0, "run-a", {**FINGERPRINT, "model.shapes": "xyz"}, "", "h")
    assert "abc" not in str(info.value)


def test_a_live_rank_cannot_be_taken_over_without_its_session() -> None:
    clock = FakeClock()
    coordinator, sessions = make_group(clock=clock)
    with pytest.raises(RankHeld, match="island rank 1 is held by a live island"):
        coordinator.join(1, "run-a", FINGERPRINT, "", "attacker")
    with pytest.raises(RankHeld):
        coordinator.join(1, "run-a", FINGERPRINT, "f" * 32, "attacker")
    # Its own island, restarted (or retrying a join whose answer was lost) with its saved
    # session, takes it back at once and keeps that session ...
    _, _, again = coordinator.join(1, "run-a", FINGERPRINT, sessions[1], "host-1")
    assert again == sessions[1]
    assert coordinator.authorize(1, sessions[1]).host == "host-1"
    # ... and an active member keeps its rank even when silent past the hold time: only one
    # that missed a round (or left) and stayed silent can be replaced.
    clock.advance(1000.0)
    with pytest.raises(RankHeld):
        coordinator.join(1, "run-a", FINGERPRINT, "", "attacker")
    coordinator.membership.members[1].active = False
    own = "ab" * 16  # an island offers its own session secret
    assert coordinator.join(1, "run-a", FINGERPRINT, own, "newcomer")[2] == own
    assert coordinator.authorize(1, own).host == "newcomer"
    assert coordinator.membership.members[1].active  # a new island: rounds expect it
    with pytest.raises(NotAuthorized):
        coordinator.authorize(1, sessions[1])  # the replaced island's session is void


def test_joining_again_does_not_make_a_member_that_missed_a_round_expected() -> None:
    clock = FakeClock()
    coordinator, sessions = make_group(clock=clock)
    run_round_at_deadline(coordinator, clock, [0, 1])
    assert not coordinator.membership.members[2].active
    coordinator.join(2, "run-a", FINGERPRINT, sessions[2], "host-2")
    assert not coordinator.membership.members[2].active
    # The next round closes with the two that report, without waiting for a deadline.
    answers = run_round(coordinator, [0, 1], deltas_for(1), [1.0, 1.0, 1.0])
    assert {a.participants for a in answers.values()} == {2}


def test_authorize_needs_the_session_of_the_rank() -> None:
    coordinator, sessions = make_group()
    assert coordinator.authorize(0, sessions[0]) is coordinator.membership.members[0]
    for rank, session in ((0, sessions[1]), (0, ""), (5, sessions[0]), (1, "x" * 10_000)):
        with pytest.raises(NotAuthorized, match="join first"):
            coordinator.authorize(rank, session)
    coordinator.leave(0)
    with pytest.raises(NotAuthorized):
        coordinator.authorize(0, sessions[0])


def test_join_refuses_oversized_or_malformed_fingerprints() -> None:
    coordinator = new_coordinator(pinned={})
    for fingerprint, fragment in (
        ({f"k{i}": "v" for i in range(200)}, "at most"),
        ({"k": "v" * 5000}, "at most"),
        ({"parameters": "10"}, None),
    ):
        if fragment is None:
            coordinator.join(0, "run-a", fingerprint, "", "h")
            continue
        with pytest.raises(GroupMismatchError, match=fragment):
            coordinator.join(0, "run-a", fingerprint, "", "h")
    assert coordinator.expected_numel() == 10


@pytest.mark.parametrize("parameters", ["²", "-3", "0", "1" * 5000, "12\n"])
def test_join_refuses_a_parameters_entry_that_is_not_a_count(parameters: str) -> None:
    coordinator = new_coordinator(pinned={})
    with pytest.raises(GroupMismatchError, match="parameters"):
        coordinator.join(0, "run-a", {"parameters": parameters}, "", "h")
    assert coordinator.expected_numel() is None


# -- a full round -----------------------------------------------------------------------------


@pytest.mark.parametrize("codec_name", ["none", "int8"])
def test_a_full_round_gives_everyone_the_same_answer_and_steps_the_anchor(
    codec_name: str,
) -> None:
    codec = build_codec(codec_name, block_size=16)
    coordinator, _ = make_group(codec)
    start = initial_state()
    deltas, weights = deltas_for(0), [1.0, 2.0, 5.0]
    sha_before = coordinator.state_sha256()
    assert sha_before == params_sha256(start.anchor)

    answers = run_round(coordinator, [0, 1, 2], deltas, weights)

    # What the coordinator must have done: the outer step with the decoded re-encoded mean.
    mean = weighted_mean(deltas, weights)
    applied = codec.decode(codec.encode(mean), NUMEL)
    anchor, momentum = start.anchor.clone(), momentum_of(start).clone()
    stepped(anchor, momentum, applied)
    state = state_of(coordinator)
    assert state.round == 1 and coordinator.round == 1
    assert torch.equal(state.anchor, anchor)
    assert torch.equal(momentum_of(state), momentum)
    assert coordinator.state_sha256() == params_sha256(anchor) != sha_before

    assert sorted(answers) == [0, 1, 2]
    for answer in answers.values():
        assert answer.round == 0 and answer.participants == 3
        assert answer.adopt is None and not answer.late
        assert answer.params_sha256 == ""  # hashed after the answers go out
        assert answer.mean_payload is not None
        assert torch.equal(answer.mean_payload, answers[0].mean_payload)
        assert torch.equal(codec.decode(answer.mean_payload, NUMEL), applied)
    assert coordinator.stats.rounds_closed == 1 and coordinator.stats.participants == [3]
    assert coordinator.stats.late_payloads == coordinator.stats.adopted == 0


def test_consecutive_rounds_track_momentum() -> None:
    coordinator, _ = make_group()
    start = initial_state()
    anchor, momentum = start.anchor.clone(), momentum_of(start).clone()
    for round in range(3):
        deltas, weights = deltas_for(round), [1.0, 1.0, 2.0]
        run_round(coordinator, [0, 1, 2], deltas, weights)
        stepped(anchor, momentum, weighted_mean(deltas, weights))
    state = state_of(coordinator)
    assert state.round == 3
    assert torch.equal(state.anchor, anchor) and torch.equal(momentum_of(state), momentum)


def test_median_aggregate_ignores_an_outlier_island() -> None:
    coordinator, _ = make_group(aggregate="median")
    start = initial_state()
    honest = torch.full((NUMEL,), 0.5)
    deltas = [honest, honest.clone(), torch.full((NUMEL,), 1e6)]
    run_round(coordinator, [0, 1, 2], deltas, [1.0, 1.0, 100.0])
    anchor, momentum = start.anchor.clone(), momentum_of(start).clone()
    stepped(anchor, momentum, honest)
    assert torch.equal(state_of(coordinator).anchor, anchor)


# -- deadlines and missing islands ------------------------------------------------------------


def test_a_round_missing_an_island_closes_only_at_its_deadline() -> None:
    clock = FakeClock()
    coordinator, _ = make_group(clock=clock)
    deltas, weights = deltas_for(0), [1.0, 1.0, 1.0]
    sha0 = coordinator.state_sha256()
    submitter = Submitter(coordinator)
    submitter.start(0, 0, sha0, deltas[0], weights[0])
    submitter.start(1, 0, sha0, deltas[1], weights[1])
    wait_until(lambda: reported(coordinator) == 2)

    clock.advance(9.9)  # the floor is 10 s after the first payload
    coordinator.tick()
    time.sleep(0.05)
    assert coordinator.round == 0 and all(t.is_alive() for t in submitter.threads.values())

    clock.advance(0.2)
    coordinator.tick()
    assert coordinator.round == 1
    answers = submitter.join()
    assert {a.participants for a in answers.values()} == {2}
    start = initial_state()
    stepped(start.anchor, momentum_of(start), weighted_mean(deltas[:2], weights[:2]))
    assert torch.equal(state_of(coordinator).anchor, start.anchor)

    # The island that missed the round is inactive: the next one closes without waiting.
    assert coordinator.active_islands() == 2
    answers = run_round(coordinator, [0, 1], deltas_for(1), weights)
    assert coordinator.round == 2 and {a.participants for a in answers.values()} == {2}
    assert coordinator.stats.participants == [2, 2]


def test_the_deadline_waits_for_min_islands() -> None:
    clock = FakeClock()
    coordinator, _ = make_group(clock=clock, min_islands=2)
    deltas, sha0 = deltas_for(0), coordinator.state_sha256()
    submitter = Submitter(coordinator)
    submitter.start(0, 0, sha0, deltas[0], 1.0)
    wait_until(lambda: reported(coordinator) == 1)
    clock.advance(50.0)  # far past the deadline, but only one of min_islands=2 reported
    coordinator.tick()
    time.sleep(0.05)
    assert coordinator.round == 0 and submitter.threads[0].is_alive()

    submitter.start(1, 0, sha0, deltas[1], 1.0)
    wait_until(lambda: coordinator.round == 1)  # the waiting submit() closes it on its next check
    answers = submitter.join()
    assert answers[0].participants == answers[1].participants == 2
    assert coordinator.active_islands() == 2


def test_submit_times_out_while_the_round_is_open() -> None:
    coordinator, _ = make_group(clock=time.monotonic)
    with pytest.raises(TimeoutError, match="round 0 is still open"):
        coordinator.submit(0, 0, 1.0, coordinator.state_sha256(), deltas_for(0)[0], wait_s=0.05)
    assert coordinator.round == 0


def test_a_leaving_island_no_longer_holds_the_round() -> None:
    coordinator, _ = make_group()
    deltas, sha0 = deltas_for(0), coordinator.state_sha256()
    submitter = Submitter(coordinator)
    submitter.start(0, 0, sha0, deltas[0], 1.0)
    submitter.start(1, 0, sha0, deltas[1], 1.0)
    wait_until(lambda: reported(coordinator) == 2)
    assert coordinator.round == 0
    coordinator.leave(2)
    answers = submitter.join()
    assert coordinator.round == 1 and answers[0].participants == 2


def test_the_history_keeps_the_means_of_the_last_rounds_only() -> None:
    """Every closed round's mean was kept in the history (200 rounds): a coordinator's memory
    grew by one payload per round (6.3 MiB per round with a 1.6M-parameter model)."""
    coordinator, _ = make_group()
    for round in range(4):
        run_round(coordinator, [0, 1, 2], deltas_for(round), [1.0, 1.0, 1.0])
    held = [closed.mean_payload.numel() > 0 for closed in coordinator.closer.history.rounds]
    assert held == [False, False, True, True]
    assert [closed.participants for closed in coordinator.closer.history.rounds] == [3, 3, 3, 3]


# -- late, stale and refused payloads ---------------------------------------------------------


def test_late_payload_gets_the_closed_rounds_mean_and_older_ones_adopt() -> None:
    clock = FakeClock()
    coordinator, _ = make_group(clock=clock)
    weights = [1.0, 1.0, 1.0]
    sha0 = coordinator.state_sha256()
    submitter = Submitter(coordinator)
    for rank in (0, 1):
        submitter.start(rank, 0, sha0, deltas_for(0)[rank], 1.0)
    wait_until(lambda: reported(coordinator) == 2)
    clock.advance(10.0)
    coordinator.tick()
    closed = submitter.join()[0]
    assert closed.mean_payload is not None and coordinator.active_islands() == 2

    clock.advance(30.0)
    late = coordinator.submit(2, 0, 1.0, sha0, deltas_for(0)[2])
    assert late.late and late.adopt is None
    assert late.round == 0 and late.participants == 2
    assert late.params_sha256 == coordinator.state_sha256() != ""
    assert late.mean_payload is not None and torch.equal(late.mean_payload, closed.mean_payload)
    assert coordinator.stats.late_payloads == 1 and coordinator.stats.participants == [2]
    assert coordinator.round == 1
    # The late arrival, 40 s after the round's first payload, raised the deadline to 2 x 40 s.
    assert coordinator.closer.deadline.seconds() == 80.0
    # ... and the island is active again: round 1 waits for all three.
    assert coordinator.active_islands() == 3

    run_round(coordinator, [0, 1, 2], deltas_for(1), weights)
    stale = coordinator.submit(2, 0, 1.0, sha0, deltas_for(0)[2])
    assert stale.adopt is not None and stale.mean_payload is None and not stale.late
    state = state_of(coordinator)
    assert stale.adopt.round == state.round == stale.round == 2
    assert torch.equal(stale.adopt.anchor, state.anchor)
    assert torch.equal(momentum_of(stale.adopt), momentum_of(state))
    assert stale.params_sha256 == coordinator.state_sha256()
    assert coordinator.stats.adopted == 1 and coordinator.stats.late_payloads == 1


def test_an_adopt_answer_shares_the_state_instead_of_copying_it() -> None:
    """Issue 12, item 4's sibling: an adopt answer per stale caller held a full copy of the
    state while it streamed; it is now read from the keeper's state, chunk by chunk."""
    coordinator, _ = make_group()
    answer = coordinator.submit(1, 5, 1.0, coordinator.state_sha256(), None)
    assert answer.adopt is not None
    assert answer.adopt.anchor.data_ptr() == state_of(coordinator).anchor.data_ptr()
    chunks = b"".join(coordinator.keeper.read_chunks(answer.generation))
    expected = b"".join(t.numpy().tobytes() for _, t in initial_state().tensors())
    assert chunks == expected


def test_a_payload_from_other_shared_parameters_gets_adopt() -> None:
    coordinator, _ = make_group()
    sha_before = coordinator.state_sha256()
    answer = coordinator.submit(0, 0, 1.0, "0" * 64, deltas_for(0)[0])
    assert answer.adopt is not None and answer.mean_payload is None
    assert answer.round == 0 and answer.params_sha256 == sha_before
    assert torch.equal(answer.adopt.anchor, initial_state().anchor)
    assert coordinator.stats.adopted == 1 and coordinator.round == 0
    assert coordinator.state_sha256() == sha_before
    # Its payload did not reach the round; rank 0 is still expected (it retries after adopting).
    run_round(coordinator, [0, 1, 2], deltas_for(0), [1.0, 1.0, 1.0])
    assert coordinator.stats.participants == [3]


def test_a_submit_without_a_payload_gets_adopt() -> None:
    coordinator, _ = make_group()
    answer = coordinator.submit(1, 0, 1.0, coordinator.state_sha256(), None)
    assert answer.adopt is not None and coordinator.stats.adopted == 1


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e300])
def test_submit_refuses_a_weight_that_is_not_finite_positive_tokens(weight: float) -> None:
    """Issue 12, item 1: `nan <= 0` and `inf <= 0` are False, so the old check let both in."""
    coordinator, _ = make_group()
    with pytest.raises(RefusedPayload, match="weight must be finite tokens"):
        coordinator.submit(0, 0, weight, coordinator.state_sha256(), deltas_for(0)[0])
    assert reported(coordinator) == 0


def test_submit_and_decode_before_state_or_join_are_not_ready() -> None:
    coordinator = new_coordinator()
    coordinator.join(0, "run-a", FINGERPRINT, "", "h")
    with pytest.raises(NotReady, match="no shared state"):
        coordinator.submit(0, 0, 1.0, "", torch.zeros(NUMEL))
    with pytest.raises(NotReady, match="no shared state"):
        coordinator.decode(build_codec("none").encode(torch.zeros(NUMEL)))
    coordinator.seed(0, initial_state())
    with pytest.raises(NotReady, match="island 1 has not joined"):
        coordinator.submit(1, 0, 1.0, coordinator.state_sha256(), torch.zeros(NUMEL))


def test_decode_refuses_a_nan_payload() -> None:
    coordinator, _ = make_group()
    sha_before = coordinator.state_sha256()
    # The codec refuses to encode NaN, so write it into a valid payload's fp32 body by hand.
    payload = build_codec("none").encode(torch.zeros(NUMEL))
    body = payload[HEADER_BYTES:].view(torch.float32)
    body[3], body[7] = float("nan"), float("inf")
    with pytest.raises(RefusedPayload, match="2 non-finite value"):
        coordinator.decode(payload)
    assert coordinator.state_sha256() == sha_before and coordinator.round == 0


@pytest.mark.parametrize("codec_name", ["none", "int8"])
def test_decode_refuses_a_wrong_size_payload(codec_name: str) -> None:
    codec = build_codec(codec_name, block_size=16)
    coordinator, _ = make_group(codec)
    sha_before = coordinator.state_sha256()
    good = codec.encode(torch.ones(NUMEL))
    assert torch.equal(coordinator.decode(good), codec.decode(good, NUMEL))
    with pytest.raises(RefusedPayload):
        coordinator.decode(codec.encode(torch.ones(NUMEL + 1)))
    with pytest.raises(RefusedPayload):
        coordinator.decode(good[:-1])
    assert coordinator.state_sha256() == sha_before and coordinator.round == 0


def test_decode_refuses_another_codec() -> None:
    coordinator, _ = make_group(build_codec("none"))
    with pytest.raises(RefusedPayload):
        coordinator.decode(build_codec("int8", block_size=16).encode(torch.ones(NUMEL)))


# -- a contribution that poisons the mean -----------------------------------------------------


def test_a_contribution_whose_mean_cannot_be_encoded_is_dropped_and_the_round_closes() -> None:
    """Issue 12, item 1's root: a failure while closing a round left it poisoned (every later
    close raised again). The culprit is dropped and counted; the others get their mean."""
    coordinator, _ = make_group(codec=PickyCodec())
    sha0 = coordinator.state_sha256()
    honest = [torch.full((NUMEL,), 0.5), torch.full((NUMEL,), 0.25)]
    poison = torch.full((NUMEL,), 1e35)
    submitter = Submitter(coordinator)
    submitter.start(0, 0, sha0, honest[0], 1.0)
    submitter.start(1, 0, sha0, honest[1], 1.0)
    submitter.start(2, 0, sha0, poison, 1.0)
    answers = submitter.join()
    assert {a.participants for a in answers.values()} == {2}
    assert coordinator.stats.dropped_payloads == 1
    assert coordinator.last_closed is not None and coordinator.last_closed.ranks == (0, 1)
    start = initial_state()
    stepped(start.anchor, momentum_of(start), weighted_mean(honest, [1.0, 1.0]))
    assert torch.equal(state_of(coordinator).anchor, start.anchor)
    # The round after it is not poisoned.
    run_round(coordinator, [0, 1, 2], deltas_for(1), [1.0, 1.0, 1.0])
    assert coordinator.stats.participants == [2, 3]


def test_the_deadline_thread_survives_a_round_where_nothing_combines() -> None:
    clock = FakeClock()
    coordinator, _ = make_group(codec=PickyCodec(), clock=clock, min_islands=1)
    sha0 = coordinator.state_sha256()
    submitter = Submitter(coordinator)
    submitter.start(2, 0, sha0, torch.full((NUMEL,), 1e35), 1.0)
    wait_until(lambda: reported(coordinator) == 1)
    clock.advance(10.0)
    coordinator.tick()  # must not raise
    answer = submitter.join()[2]
    # Closed with nobody in it: a zero mean (the same bits for every island and the
    # coordinator), counted as dropped.
    assert coordinator.round == 1 and answer.participants == 0
    assert coordinator.stats.dropped_payloads == 1 and coordinator.stats.participants == [0]
    assert answer.mean_payload is not None
    assert torch.equal(PickyCodec().decode(answer.mean_payload, NUMEL), torch.zeros(NUMEL))
    answers = run_round(coordinator, [0, 1, 2], deltas_for(1), [1.0, 1.0, 1.0])
    assert {a.participants for a in answers.values()} == {3}


# -- seeding the state ------------------------------------------------------------------------


def test_seed_refuses_a_state_of_another_size_or_round_or_with_non_finite_values() -> None:
    """Issue 12, item 3: the state must be the group's model's size; its round in range."""
    coordinator = new_coordinator(pinned={"parameters": str(NUMEL)})
    coordinator.join(0, "run-a", {"parameters": str(NUMEL)}, "", "h")
    cases = [
        (SharedState(0, torch.zeros(16), {}), "the state has 16 parameters, the group's model 40"),
        (SharedState(-1, torch.zeros(NUMEL), {}), "round -1 is outside"),
        (SharedState(11, torch.zeros(NUMEL), {}), "round 11 is outside"),
        (SharedState(0, torch.zeros(NUMEL), {"m": torch.zeros(3)}), "do not match"),
        (SharedState(0, torch.full((NUMEL,), float("nan")), {}), "non-finite"),
    ]
    for state, fragment in cases:
        with pytest.raises(RefusedPayload, match=fragment):
            coordinator.seed(0, state)
    assert not coordinator.has_state()
    assert coordinator.seed(0, SharedState(10, torch.zeros(NUMEL), {}))


def test_seed_at_round_zero_must_be_the_groups_initial_weights() -> None:
    state = initial_state()
    fingerprint = {"initial weights": params_sha256(state.anchor)[:16]}
    coordinator = new_coordinator(pinned={})
    coordinator.join(0, "run-a", fingerprint, "", "h")
    forged = SharedState(0, state.anchor + 1, {"momentum": torch.zeros(NUMEL)})
    with pytest.raises(RefusedPayload, match="not the group's initial weights"):
        coordinator.seed(0, forged)
    assert coordinator.seed(0, state)


# -- persistence ------------------------------------------------------------------------------


def test_a_restarted_coordinator_resumes_where_it_stopped(tmp_path: Path) -> None:
    coordinator, sessions = make_group(state_dir=tmp_path)
    answers = run_round(coordinator, [0, 1, 2], deltas_for(0), [1.0, 2.0, 3.0])
    sha0 = params_sha256(initial_state().anchor)
    stats = coordinator.stats
    coordinator.flush()

    again = new_coordinator(state_dir=tmp_path)
    assert again.round == coordinator.round == 1
    assert again.state_sha256() == coordinator.state_sha256()
    before, after = state_of(coordinator), state_of(again)
    assert torch.equal(before.anchor, after.anchor)
    assert torch.equal(momentum_of(before), momentum_of(after))
    assert again.active_islands() == 3
    assert again.stats.rounds_closed == stats.rounds_closed == 1
    assert again.stats.participants == [3]
    # The fingerprint came back with the state ...
    with pytest.raises(GroupMismatchError, match="outer.lr"):
        again.join(0, "run-a", {**FINGERPRINT, "outer.lr": "0.1"}, "", "h")
    # ... and so did the sessions: the islands still hold their ranks.
    assert again.authorize(1, sessions[1]).host == "host-1"
    with pytest.raises(RankHeld):
        again.join(1, "run-a", FINGERPRINT, "", "someone else")

    # An island retrying its payload for the last round (its answer was lost with the old
    # coordinator) gets that round's mean; it is a retry, not a late payload.
    retry = again.submit(1, 0, 1.0, sha0, deltas_for(0)[1])
    assert not retry.late and retry.round == 0 and retry.participants == 3
    assert retry.mean_payload is not None
    assert torch.equal(retry.mean_payload, answers[1].mean_payload)
    assert retry.params_sha256 == again.state_sha256()
    assert again.stats.late_payloads == 0

    # ... and the group carries on with the restored members.
    run_round(again, [0, 1, 2], deltas_for(1), [1.0, 1.0, 1.0])
    assert again.round == 2 and again.stats.participants == [3, 3]


def test_a_restarted_coordinator_before_any_round_holds_the_seeded_state(
    tmp_path: Path,
) -> None:
    coordinator, _ = make_group(state_dir=tmp_path)
    again = new_coordinator(state_dir=tmp_path, pinned={})
    assert again.round == 0 and again.has_state()
    assert again.state_sha256() == coordinator.state_sha256()
    other = SharedState(0, torch.ones(NUMEL), {"momentum": torch.zeros(NUMEL)})
    assert not again.seed(0, other)


def test_a_left_island_is_not_expected_after_a_restart(tmp_path: Path) -> None:
    coordinator, _ = make_group(state_dir=tmp_path)
    coordinator.leave(2)
    run_round(coordinator, [0, 1], deltas_for(0), [1.0, 1.0, 1.0])
    coordinator.flush()
    again = new_coordinator(state_dir=tmp_path, pinned={})
    assert again.active_islands() == 2
    # The fake clock never reaches the deadline: the round must close on its own.
    submitter = Submitter(again)
    for rank in (0, 1):
        submitter.start(rank, 1, again.state_sha256(), deltas_for(1)[rank], 1.0)
    wait_until(lambda: again.round == 2, timeout_s=2.0)
    assert {a.participants for a in submitter.join().values()} == {2}


def test_fingerprint_values_are_logged_escaped(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 12, item 6: a value with a newline must not write a second log line."""
    coordinator = new_coordinator(pinned={})
    coordinator.join(0, "run-a", FINGERPRINT, "", "h")
    forged = "0.5\n2026-01-01 00:00:00 INFO coordinator: island 1 joined"
    with caplog.at_level(logging.INFO):
        with pytest.raises(GroupMismatchError):
            coordinator.join(1, "run-a", {**FINGERPRINT, "outer.lr": forged}, "", "h\nx")
        coordinator.join(1, "run-a", FINGERPRINT, "", "host\nINFO forged")
    for record in caplog.records:
        assert "\n" not in record.getMessage(), record.getMessage()
    assert "'0.5\\n2026-01-01" in caplog.text
