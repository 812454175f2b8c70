"""RoundBook, the grpc coordinator's state machine, driven by threads and a hand-moved clock."""

from __future__ import annotations

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
from diloco.outer.sync import params_sha256
from diloco.transports.base import GroupMismatchError, SharedState
from diloco.transports.grpc.rounds import (
    NotReady,
    RefusedPayload,
    RoundAnswer,
    RoundBook,
    RoundRules,
)

pytestmark = pytest.mark.timeout(30)

NUMEL = 40
FINGERPRINT = {"model.shapes": "abc", "outer.lr": "0.7"}
JOIN_S = 5.0  # a bug must fail the test, never hang the suite


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_rules(**overrides: Any) -> RoundRules:
    rules: dict[str, Any] = dict(
        run_id="run-a",
        rounds=10,
        islands=3,
        min_islands=2,
        lr=0.7,
        momentum=0.9,
        nesterov=True,
        deadline_floor_s=10.0,
        deadline_ceiling_s=100.0,
        deadline_slack=2.0,
    )
    rules.update(overrides)
    return RoundRules(**rules)


def initial_state() -> SharedState:
    generator = torch.Generator().manual_seed(0)
    return SharedState(0, torch.randn(NUMEL, generator=generator), torch.zeros(NUMEL))


def deltas_for(round: int, islands: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + round)
    return [torch.randn(NUMEL, generator=generator) * (rank + 1) for rank in range(islands)]


def make_book(
    codec: Codec | None = None,
    state_dir: Path | None = None,
    clock: Callable[[], float] | None = None,
    **rules: Any,
) -> RoundBook:
    book = RoundBook(
        make_rules(**rules),
        codec or build_codec("none"),
        {"model.shapes": "abc"},
        state_dir,
        clock=clock or FakeClock(),
    )
    for rank in range(book.rules.islands):
        book.join(rank, "run-a", FINGERPRINT)
    assert book.seed(initial_state())
    return book


class Submitter:
    """submit() from one thread per island: it blocks until the round closes."""

    def __init__(self, book: RoundBook) -> None:
        self.book = book
        self.threads: dict[int, threading.Thread] = {}
        self.answers: dict[int, RoundAnswer] = {}
        self.errors: dict[int, BaseException] = {}

    def start(self, rank: int, round: int, sha: str, delta: torch.Tensor, weight: float) -> None:
        def target() -> None:
            try:
                self.answers[rank] = self.book.submit(rank, round, weight, sha, delta)
            except BaseException as error:  # re-raised in the test's thread by join()
                self.errors[rank] = error

        thread = threading.Thread(target=target, daemon=True)
        self.threads[rank] = thread
        thread.start()

    def join(self) -> dict[int, RoundAnswer]:
        for thread in self.threads.values():
            thread.join(JOIN_S)
            if thread.is_alive():
                self.book.stop()  # releases the blocked threads before the test fails
                raise AssertionError("submit() did not return")
        if self.errors:
            raise next(iter(self.errors.values()))
        return self.answers


def reported(book: RoundBook) -> int:
    """Payloads the open round holds (read under the book's lock)."""
    with book._cond:
        return len(book._pending)


def wait_until(condition: Callable[[], bool], timeout_s: float = JOIN_S) -> None:
    limit = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < limit, "condition not reached"
        time.sleep(0.002)


def run_round(
    book: RoundBook, ranks: list[int], deltas: list[torch.Tensor], weights: list[float]
) -> dict[int, RoundAnswer]:
    round, sha = book.round, book.state_sha256()
    submitter = Submitter(book)
    for rank in ranks:
        submitter.start(rank, round, sha, deltas[rank], weights[rank])
    return submitter.join()


# -- join -------------------------------------------------------------------------------------


def test_join_returns_the_round_and_whether_the_group_has_state() -> None:
    book = RoundBook(make_rules(), build_codec("none"), {}, None, clock=FakeClock())
    assert book.join(0, "run-a", FINGERPRINT) == (0, False)
    assert book.seed(initial_state())
    assert not book.seed(SharedState(5, torch.ones(NUMEL), torch.ones(NUMEL)))
    assert book.join(1, "run-a", FINGERPRINT) == (0, True)
    assert book.active_islands() == 2


def test_join_refuses_another_run_id() -> None:
    book = RoundBook(make_rules(), build_codec("none"), {}, None)
    with pytest.raises(GroupMismatchError, match="transport.run_id differs.*'run-b'"):
        book.join(0, "run-b", FINGERPRINT)
    assert book.active_islands() == 0


@pytest.mark.parametrize("rank", [-1, 3])
def test_join_refuses_a_rank_out_of_range(rank: int) -> None:
    book = RoundBook(make_rules(), build_codec("none"), {}, None)
    with pytest.raises(GroupMismatchError, match=rf"rank {rank} is outside \[0, "):
        book.join(rank, "run-a", FINGERPRINT)


def test_join_refuses_a_fingerprint_that_differs_from_the_first_island() -> None:
    book = RoundBook(make_rules(), build_codec("none"), {}, None)
    book.join(0, "run-a", FINGERPRINT)
    with pytest.raises(GroupMismatchError, match="outer.lr: group 0.7, island 1 0.5") as info:
        book.join(1, "run-a", {**FINGERPRINT, "outer.lr": "0.5"})
    assert "model.shapes" not in str(info.value)
    with pytest.raises(GroupMismatchError, match="model.shapes: group abc, island 2 None"):
        book.join(2, "run-a", {"outer.lr": "0.7"})
    assert book.active_islands() == 1


def test_join_refuses_a_fingerprint_that_differs_from_the_coordinator_settings() -> None:
    book = RoundBook(make_rules(), build_codec("none"), {"model.shapes": "abc"}, None)
    with pytest.raises(GroupMismatchError, match="model.shapes: group abc, island 0 xyz"):
        book.join(0, "run-a", {**FINGERPRINT, "model.shapes": "xyz"})


# -- a full round -----------------------------------------------------------------------------


@pytest.mark.parametrize("codec_name", ["none", "int8"])
def test_a_full_round_gives_everyone_the_same_answer_and_steps_the_anchor(
    codec_name: str,
) -> None:
    codec = build_codec(codec_name, block_size=16)
    book = make_book(codec)
    start = initial_state()
    deltas, weights = deltas_for(0), [1.0, 2.0, 5.0]
    sha_before = book.state_sha256()
    assert sha_before == params_sha256(start.anchor)

    answers = run_round(book, [0, 1, 2], deltas, weights)

    # What the coordinator must have done: the outer step with the decoded re-encoded mean.
    mean = weighted_mean(deltas, weights)
    applied = codec.decode(codec.encode(mean), NUMEL)
    anchor, momentum = start.anchor.clone(), start.momentum.clone()
    nesterov_step_(anchor, applied, momentum, lr=0.7, mu=0.9, nesterov=True)
    state = book.state()
    assert state is not None and state.round == 1 and book.round == 1
    assert torch.equal(state.anchor, anchor)
    assert torch.equal(state.momentum, momentum)
    assert book.state_sha256() == params_sha256(anchor) != sha_before

    assert sorted(answers) == [0, 1, 2]
    for answer in answers.values():
        assert answer.round == 0 and answer.participants == 3
        assert answer.adopt is None and not answer.late
        assert answer.params_sha256 == ""  # hashed after the answers go out
        assert answer.mean_payload is not None
        assert torch.equal(answer.mean_payload, answers[0].mean_payload)
        assert torch.equal(codec.decode(answer.mean_payload, NUMEL), applied)
    assert book.stats.rounds_closed == 1 and book.stats.participants == [3]
    assert book.stats.late_payloads == book.stats.adopted == 0


def test_consecutive_rounds_track_momentum() -> None:
    book = make_book()
    start = initial_state()
    anchor, momentum = start.anchor.clone(), start.momentum.clone()
    for round in range(3):
        deltas, weights = deltas_for(round), [1.0, 1.0, 2.0]
        run_round(book, [0, 1, 2], deltas, weights)
        mean = weighted_mean(deltas, weights)
        nesterov_step_(anchor, mean, momentum, lr=0.7, mu=0.9, nesterov=True)
    state = book.state()
    assert state is not None and state.round == 3
    assert torch.equal(state.anchor, anchor) and torch.equal(state.momentum, momentum)


def test_median_aggregate_ignores_an_outlier_island() -> None:
    book = make_book(aggregate="median")
    start = initial_state()
    honest = torch.full((NUMEL,), 0.5)
    deltas = [honest, honest.clone(), torch.full((NUMEL,), 1e6)]
    run_round(book, [0, 1, 2], deltas, [1.0, 1.0, 100.0])
    anchor, momentum = start.anchor.clone(), start.momentum.clone()
    nesterov_step_(anchor, honest, momentum, lr=0.7, mu=0.9, nesterov=True)
    state = book.state()
    assert state is not None and torch.equal(state.anchor, anchor)


# -- deadlines and missing islands ------------------------------------------------------------


def test_a_round_missing_an_island_closes_only_at_its_deadline() -> None:
    clock = FakeClock()
    book = make_book(clock=clock)
    deltas, weights = deltas_for(0), [1.0, 1.0, 1.0]
    sha0 = book.state_sha256()
    submitter = Submitter(book)
    submitter.start(0, 0, sha0, deltas[0], weights[0])
    submitter.start(1, 0, sha0, deltas[1], weights[1])
    wait_until(lambda: reported(book) == 2)

    clock.advance(9.9)  # the floor is 10 s after the first payload
    book.tick()
    time.sleep(0.05)
    assert book.round == 0 and all(t.is_alive() for t in submitter.threads.values())

    clock.advance(0.2)
    book.tick()
    assert book.round == 1
    answers = submitter.join()
    assert {a.participants for a in answers.values()} == {2}
    mean = weighted_mean(deltas[:2], weights[:2])
    state = book.state()
    start = initial_state()
    nesterov_step_(start.anchor, mean, start.momentum, lr=0.7, mu=0.9, nesterov=True)
    assert state is not None and torch.equal(state.anchor, start.anchor)

    # The island that missed the round is inactive: the next one closes without waiting.
    assert book.active_islands() == 2
    answers = run_round(book, [0, 1], deltas_for(1), weights)
    assert book.round == 2 and {a.participants for a in answers.values()} == {2}
    assert book.stats.participants == [2, 2]


def test_the_deadline_waits_for_min_islands() -> None:
    clock = FakeClock()
    book = make_book(clock=clock, min_islands=2)
    deltas, sha0 = deltas_for(0), book.state_sha256()
    submitter = Submitter(book)
    submitter.start(0, 0, sha0, deltas[0], 1.0)
    wait_until(lambda: reported(book) == 1)
    clock.advance(50.0)  # far past the deadline, but only one of min_islands=2 reported
    book.tick()
    time.sleep(0.05)
    assert book.round == 0 and submitter.threads[0].is_alive()

    submitter.start(1, 0, sha0, deltas[1], 1.0)
    wait_until(lambda: book.round == 1)  # the waiting submit() closes it on its next check
    answers = submitter.join()
    assert answers[0].participants == answers[1].participants == 2
    assert book.active_islands() == 2


def test_submit_times_out_while_the_round_is_open() -> None:
    book = make_book(clock=time.monotonic)
    with pytest.raises(TimeoutError, match="round 0 is still open"):
        book.submit(0, 0, 1.0, book.state_sha256(), deltas_for(0)[0], wait_s=0.05)
    assert book.round == 0


def test_a_leaving_island_no_longer_holds_the_round() -> None:
    book = make_book()
    deltas, sha0 = deltas_for(0), book.state_sha256()
    submitter = Submitter(book)
    submitter.start(0, 0, sha0, deltas[0], 1.0)
    submitter.start(1, 0, sha0, deltas[1], 1.0)
    wait_until(lambda: reported(book) == 2)
    assert book.round == 0
    book.leave(2)
    answers = submitter.join()
    assert book.round == 1 and answers[0].participants == 2


# -- late, stale and refused payloads ---------------------------------------------------------


def test_late_payload_gets_the_closed_rounds_mean_and_older_ones_adopt() -> None:
    clock = FakeClock()
    book = make_book(clock=clock)
    weights = [1.0, 1.0, 1.0]
    sha0 = book.state_sha256()
    submitter = Submitter(book)
    for rank in (0, 1):
        submitter.start(rank, 0, sha0, deltas_for(0)[rank], 1.0)
    wait_until(lambda: reported(book) == 2)
    clock.advance(10.0)
    book.tick()
    closed = submitter.join()[0]
    assert closed.mean_payload is not None and book.active_islands() == 2

    clock.advance(30.0)
    late = book.submit(2, 0, 1.0, sha0, deltas_for(0)[2])
    assert late.late and late.adopt is None
    assert late.round == 0 and late.participants == 2
    assert late.params_sha256 == book.state_sha256() != ""
    assert late.mean_payload is not None and torch.equal(late.mean_payload, closed.mean_payload)
    assert book.stats.late_payloads == 1 and book.stats.participants == [2]
    assert book.round == 1
    # The late arrival, 40 s after the round's first payload, raised the deadline to 2 x 40 s.
    assert book.deadline.seconds() == 80.0
    # ... and the island is active again: round 1 waits for all three.
    assert book.active_islands() == 3

    run_round(book, [0, 1, 2], deltas_for(1), weights)
    stale = book.submit(2, 0, 1.0, sha0, deltas_for(0)[2])
    assert stale.adopt is not None and stale.mean_payload is None and not stale.late
    state = book.state()
    assert state is not None
    assert stale.adopt.round == state.round == stale.round == 2
    assert torch.equal(stale.adopt.anchor, state.anchor)
    assert torch.equal(stale.adopt.momentum, state.momentum)
    assert stale.params_sha256 == book.state_sha256()
    assert book.stats.adopted == 1 and book.stats.late_payloads == 1


def test_a_payload_from_other_shared_parameters_gets_adopt() -> None:
    book = make_book()
    sha_before = book.state_sha256()
    answer = book.submit(0, 0, 1.0, "0" * 64, deltas_for(0)[0])
    assert answer.adopt is not None and answer.mean_payload is None
    assert answer.round == 0 and answer.params_sha256 == sha_before
    assert torch.equal(answer.adopt.anchor, initial_state().anchor)
    assert book.stats.adopted == 1 and book.round == 0 and book.state_sha256() == sha_before
    # Its payload did not reach the round; rank 0 is still expected (it retries after adopting).
    run_round(book, [0, 1, 2], deltas_for(0), [1.0, 1.0, 1.0])
    assert book.stats.participants == [3]


def test_a_submit_without_a_payload_gets_adopt() -> None:
    book = make_book()
    answer = book.submit(1, 0, 1.0, book.state_sha256(), None)
    assert answer.adopt is not None and book.stats.adopted == 1


def test_submit_refuses_a_weight_of_zero() -> None:
    book = make_book()
    with pytest.raises(RefusedPayload, match="weight must be > 0 tokens, got 0"):
        book.submit(0, 0, 0.0, book.state_sha256(), deltas_for(0)[0])
    assert reported(book) == 0


def test_submit_and_decode_before_state_or_join_are_not_ready() -> None:
    book = RoundBook(make_rules(), build_codec("none"), {}, None)
    book.join(0, "run-a", FINGERPRINT)
    with pytest.raises(NotReady, match="no shared state"):
        book.submit(0, 0, 1.0, "", torch.zeros(NUMEL))
    with pytest.raises(NotReady, match="no shared state"):
        book.decode(build_codec("none").encode(torch.zeros(NUMEL)))
    book.seed(initial_state())
    with pytest.raises(NotReady, match="island 1 has not joined"):
        book.submit(1, 0, 1.0, book.state_sha256(), torch.zeros(NUMEL))


def test_decode_refuses_a_nan_payload() -> None:
    book = make_book()
    sha_before = book.state_sha256()
    # The codec refuses to encode NaN, so write it into a valid payload's fp32 body by hand.
    payload = build_codec("none").encode(torch.zeros(NUMEL))
    body = payload[HEADER_BYTES:].view(torch.float32)
    body[3], body[7] = float("nan"), float("inf")
    with pytest.raises(RefusedPayload, match="2 non-finite value"):
        book.decode(payload)
    assert book.state_sha256() == sha_before and book.round == 0


@pytest.mark.parametrize("codec_name", ["none", "int8"])
def test_decode_refuses_a_wrong_size_payload(codec_name: str) -> None:
    codec = build_codec(codec_name, block_size=16)
    book = make_book(codec)
    sha_before = book.state_sha256()
    good = codec.encode(torch.ones(NUMEL))
    assert torch.equal(book.decode(good), codec.decode(good, NUMEL))
    with pytest.raises(RefusedPayload):
        book.decode(codec.encode(torch.ones(NUMEL + 1)))
    with pytest.raises(RefusedPayload):
        book.decode(good[:-1])
    assert book.state_sha256() == sha_before and book.round == 0


def test_decode_refuses_another_codec() -> None:
    book = make_book(build_codec("none"))
    with pytest.raises(RefusedPayload):
        book.decode(build_codec("int8", block_size=16).encode(torch.ones(NUMEL)))


# -- persistence ------------------------------------------------------------------------------


def test_a_restarted_coordinator_resumes_where_it_stopped(tmp_path: Path) -> None:
    book = make_book(state_dir=tmp_path)
    answers = run_round(book, [0, 1, 2], deltas_for(0), [1.0, 2.0, 3.0])
    sha0 = params_sha256(initial_state().anchor)
    stats = book.stats
    book.flush()

    again = RoundBook(
        make_rules(), build_codec("none"), {"model.shapes": "abc"}, tmp_path, clock=FakeClock()
    )
    assert again.round == book.round == 1
    assert again.state_sha256() == book.state_sha256()
    before, after = book.state(), again.state()
    assert before is not None and after is not None
    assert torch.equal(before.anchor, after.anchor)
    assert torch.equal(before.momentum, after.momentum)
    assert again.active_islands() == 3
    assert again.stats.rounds_closed == stats.rounds_closed == 1
    assert again.stats.participants == [3]
    # The fingerprint came back with the state.
    with pytest.raises(GroupMismatchError, match="outer.lr"):
        again.join(0, "run-a", {**FINGERPRINT, "outer.lr": "0.1"})

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
    book = make_book(state_dir=tmp_path)
    again = RoundBook(make_rules(), build_codec("none"), {}, tmp_path, clock=FakeClock())
    assert again.round == 0 and again.has_state()
    assert again.state_sha256() == book.state_sha256()
    assert not again.seed(SharedState(0, torch.ones(NUMEL), torch.zeros(NUMEL)))


def test_a_left_island_is_not_expected_after_a_restart(tmp_path: Path) -> None:
    book = make_book(state_dir=tmp_path)
    book.leave(2)
    run_round(book, [0, 1], deltas_for(0), [1.0, 1.0, 1.0])
    book.flush()
    again = RoundBook(make_rules(), build_codec("none"), {}, tmp_path, clock=FakeClock())
    assert again.active_islands() == 2
    # The fake clock never reaches the deadline: the round must close on its own.
    submitter = Submitter(again)
    for rank in (0, 1):
        submitter.start(rank, 1, again.state_sha256(), deltas_for(1)[rank], 1.0)
    wait_until(lambda: again.round == 2, timeout_s=2.0)
    assert {a.participants for a in submitter.join().values()} == {2}
