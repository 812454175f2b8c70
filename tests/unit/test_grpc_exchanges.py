"""The data plane's control on the coordinator (`grpc/exchanges.py`), without sockets.

Islands are threads calling `Coordinator.submit_header`; the data plane is a fake host that
hands out tickets and, when the test says so, ends an exchange: with the mean computed by the
real `LockstepAccumulator` from in-memory payloads, or with a failure. The round's rules are
today's: who takes part, late payloads, refusals, deadlines, what the state becomes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from harness import wait_for

from diloco.aggregate import weighted_mean
from diloco.codecs import Codec, build_codec
from diloco.outer.nesterov import nesterov_step_
from diloco.outer.optimizers import SgdOuter
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.dataplane.accumulate import Contribution as Stream
from diloco.transports.dataplane.accumulate import LockstepAccumulator
from diloco.transports.grpc import state_keeper
from diloco.transports.grpc.coordinator import Coordinator, RoundAnswer
from diloco.transports.grpc.dataplane_host import MemoryReader
from diloco.transports.grpc.exchanges import (
    GroupEnd,
    GroupSpec,
    RefusedOnDataPlane,
    TicketAnswer,
)
from diloco.transports.grpc.rounds import RoundRules
from diloco.transports.grpc.state_keeper import ANSWERS_FIRST_S, AnswersSent

pytestmark = pytest.mark.timeout(30)

NUMEL = 1000
JOIN_S = 5.0
SGD = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeHost:
    """Tickets by (round, attempt, rank); exchanges end when the test says so."""

    port = 4242

    def __init__(self) -> None:
        self.groups: list[tuple[GroupSpec, Codec, Callable[[GroupSpec, GroupEnd], None]]] = []
        self.used: set[bytes] = set()

    def open_group(
        self, spec: GroupSpec, codec: Codec, on_end: Callable[[GroupSpec, GroupEnd], None]
    ) -> dict[int, bytes]:
        self.groups.append((spec, codec, on_end))
        return {rank: f"{spec.round}/{spec.attempt}/{rank}".encode() for rank in spec.weights}

    def unused(self, ticket: bytes) -> bool:
        return ticket not in self.used

    def poll(self) -> None:
        pass

    @property
    def spec(self) -> GroupSpec:
        return self.groups[-1][0]

    def finish(
        self, payloads: dict[int, torch.Tensor], answers_sent: AnswersSent | None = None
    ) -> torch.Tensor:
        """End the latest exchange with the lockstep mean of the participants' payloads."""
        spec, codec, on_end = self.groups[-1]
        accumulator = LockstepAccumulator(codec, spec.numel, chunk_bytes=1024, prefetch=False)
        streams = [
            Stream(rank, weight, MemoryReader(payloads[rank]))
            for rank, weight in spec.weights.items()
        ]
        mean = accumulator.encoded_mean(streams)
        on_end(spec, GroupEnd(mean, answers_sent=answers_sent))
        return mean

    def fail(self, failed: tuple[int, ...], reason: str) -> None:
        spec, _, on_end = self.groups[-1]
        on_end(spec, GroupEnd(None, failed, reason, f"island(s) {failed}: {reason}"))


def make_group(
    islands: int = 3, min_islands: int = 2, codec_name: str = "none"
) -> tuple[Coordinator, FakeHost, FakeClock]:
    clock = FakeClock()
    rules = RoundRules(
        run_id="run",
        rounds=10,
        islands=islands,
        min_islands=min_islands,
        deadline_floor_s=10.0,
        deadline_ceiling_s=100.0,
    )
    coordinator = Coordinator(
        rules, build_codec(codec_name), SGD, pinned={}, state_dir=None, clock=clock
    )
    for rank in range(islands):
        coordinator.join(rank, "run", {"model": "m"}, "", "h")
    anchor = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    assert coordinator.seed(0, SharedState(0, anchor, {"momentum": torch.zeros(NUMEL)}))
    host = FakeHost()
    coordinator.attach_exchanges(host)
    return coordinator, host, clock


def payloads(codec: Codec, ranks: list[int], round: int = 0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(10 + round)
    return {rank: codec.encode(torch.randn(NUMEL, generator=generator)) for rank in ranks}


class Headers:
    """submit_header from one thread per island."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.threads: dict[int, threading.Thread] = {}
        self.answers: dict[int, Any] = {}

    def start(self, rank: int, weight: float = 1.0, round: int | None = None) -> None:
        round = self.coordinator.round if round is None else round
        sha = self.coordinator.state_sha256()

        def target() -> None:
            try:
                self.answers[rank] = self.coordinator.submit_header(rank, round, weight, sha)
            except BaseException as error:  # returned to the test, which checks it
                self.answers[rank] = error

        self.threads[rank] = threading.Thread(target=target, daemon=True)
        self.threads[rank].start()

    def join(self, *ranks: int) -> dict[int, Any]:
        for rank in ranks or tuple(self.threads):
            self.threads[rank].join(JOIN_S)
            if self.threads[rank].is_alive():
                self.coordinator.stop()
                raise AssertionError(f"submit_header of island {rank} did not return")
        return self.answers


def waiting(coordinator: Coordinator, count: int) -> None:
    limit = time.monotonic() + JOIN_S
    while True:
        with coordinator._cond:
            if len(coordinator.closer.open.pending) >= count:
                return
        assert time.monotonic() < limit, "the headers did not arrive"
        time.sleep(0.002)


def test_a_round_fixes_its_participants_then_closes_with_the_exchanges_mean() -> None:
    coordinator, host, _ = make_group()
    codec = coordinator.codec
    start = coordinator.keeper.state
    assert start is not None
    anchor, momentum = start.anchor.clone(), torch.zeros(NUMEL)
    headers = Headers(coordinator)
    weights = {0: 100.0, 1: 250.0, 2: 50.0}
    for rank, weight in weights.items():
        headers.start(rank, weight)
    answers = headers.join()
    assert all(isinstance(a, TicketAnswer) for a in answers.values())
    assert {a.participants for a in answers.values()} == {3}
    assert len({a.ticket for a in answers.values()}) == 3 and answers[0].port == FakeHost.port
    assert dict(host.spec.weights) == weights and host.spec.attempt == 0
    assert host.spec.payload_bytes == codec.payload_bytes(NUMEL)
    assert coordinator.round == 0  # fixed, not closed: the exchange decides the mean

    sent = payloads(codec, [0, 1, 2])
    mean_payload = host.finish(sent)
    decoded = [codec.decode(sent[rank], NUMEL) for rank in (0, 1, 2)]
    expected = weighted_mean(decoded, list(weights.values()))
    assert torch.equal(mean_payload, codec.encode(expected))
    assert coordinator.round == 1 and coordinator.stats.participants == [3]
    nesterov_step_(anchor, expected, momentum, lr=0.7, mu=0.9)
    assert coordinator.state_sha256() == params_sha256(anchor)
    assert coordinator.last_closed is not None and coordinator.last_closed.ranks == (0, 1, 2)


def close_round_zero(coordinator: Coordinator, host: FakeHost, answers_sent: AnswersSent) -> str:
    """Round 0 exchanged by every island; the state's hash before its outer step."""
    headers = Headers(coordinator)
    for rank in range(3):
        headers.start(rank)
    headers.join()
    before = coordinator.state_sha256()
    host.finish(payloads(coordinator.codec, [0, 1, 2]), answers_sent)
    assert coordinator.round == 1
    return before


def never_sent(timeout_s: float) -> bool:
    time.sleep(timeout_s)
    return False


def test_the_outer_step_waits_for_the_answers_to_leave() -> None:
    coordinator, host, _ = make_group()
    sent = threading.Event()
    before = close_round_zero(coordinator, host, lambda timeout_s: sent.wait(timeout_s))
    time.sleep(0.3)
    assert coordinator.keeper.sha == before  # the answers are still on their way
    sent.set()
    wait_for(lambda: coordinator.keeper.sha != before)


def test_a_caller_that_needs_the_state_does_not_wait_for_the_answers() -> None:
    coordinator, host, _ = make_group()
    before = close_round_zero(
        coordinator, host, lambda timeout_s: threading.Event().wait(timeout_s)
    )
    started = time.monotonic()
    after = coordinator.state_sha256()  # settles: the step runs now, answers sent or not
    assert after != before
    assert time.monotonic() - started < ANSWERS_FIRST_S


def test_answers_that_never_leave_delay_the_outer_step_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state_keeper, "ANSWERS_FIRST_S", 0.2)
    coordinator, host, _ = make_group()
    before = close_round_zero(
        coordinator, host, lambda timeout_s: threading.Event().wait(timeout_s)
    )
    wait_for(lambda: coordinator.keeper.sha != before)  # nobody settled: the limit passed


def test_a_failed_participant_is_dropped_and_gets_the_mean_late() -> None:
    coordinator, host, _ = make_group()
    codec = coordinator.codec
    headers = Headers(coordinator)
    for rank in range(3):
        headers.start(rank)
    headers.join()
    host.fail((2,), "stalled")
    assert dict(host.spec.weights) == {0: 1.0, 1: 1.0} and host.spec.attempt == 1
    # The others ask again (their exchange was aborted) and get the new attempt's tickets.
    again = Headers(coordinator)
    again.start(0)
    again.start(1)
    answers = again.join()
    assert {a.ticket for a in answers.values()} == {b"0/1/0", b"0/1/1"}
    assert {a.participants for a in answers.values()} == {2}
    late = Headers(coordinator)
    late.start(2)  # the dropped island asks again: it waits for the round
    waiting_for_close = late.threads[2]
    time.sleep(0.05)
    assert waiting_for_close.is_alive()
    mean_payload = host.finish(payloads(codec, [0, 1]))
    answer = late.join()[2]
    assert isinstance(answer, RoundAnswer) and answer.late
    assert torch.equal(answer.mean_payload, mean_payload) and answer.participants == 2
    assert coordinator.stats.late_payloads == 1 and coordinator.stats.participants == [2]
    assert coordinator.stats.dropped_payloads == 1 and coordinator.stats.refused_payloads == 0


def test_a_refused_payload_is_counted_once_and_its_island_is_told() -> None:
    coordinator, host, _ = make_group()
    headers = Headers(coordinator)
    for rank in range(3):
        headers.start(rank)
    headers.join()
    host.fail((1,), "refused")
    assert coordinator.stats.refused_payloads == 1
    with pytest.raises(RefusedOnDataPlane, match="refused"):
        coordinator.submit_header(1, 0, 1.0, coordinator.state_sha256())
    again = Headers(coordinator)
    again.start(0)
    again.start(2)
    again.join()
    host.finish(payloads(coordinator.codec, [0, 2]))
    # Still refused once the round has closed; counted once.
    with pytest.raises(RefusedOnDataPlane):
        coordinator.submit_header(1, 0, 1.0, coordinator.state_sha256())
    assert coordinator.stats.refused_payloads == 1 and coordinator.stats.participants == [2]


def test_the_deadline_fixes_a_round_and_a_later_header_is_late() -> None:
    coordinator, host, clock = make_group()
    headers = Headers(coordinator)
    headers.start(0)
    headers.start(1)
    waiting(coordinator, 2)
    assert not host.groups
    clock.advance(coordinator.closer.deadline.seconds())
    coordinator.tick()
    headers.join()
    assert dict(host.spec.weights) == {0: 1.0, 1: 1.0}
    late = Headers(coordinator)
    late.start(2)
    time.sleep(0.05)
    assert late.threads[2].is_alive()  # a fixed round takes no more payloads
    host.finish(payloads(coordinator.codec, [0, 1]))
    answer = late.join()[2]
    assert isinstance(answer, RoundAnswer) and answer.late and answer.participants == 2


def test_a_ticket_is_handed_again_until_it_is_used() -> None:
    coordinator, host, _ = make_group(islands=2)
    headers = Headers(coordinator)
    headers.start(0)
    headers.start(1)
    first = headers.join()[0]
    sha = coordinator.state_sha256()
    assert coordinator.submit_header(0, 0, 1.0, sha) == first  # its answer was lost
    host.used.add(first.ticket)
    blocked = Headers(coordinator)
    blocked.start(0)  # its ticket is in use: it waits for the attempt's end
    time.sleep(0.05)
    assert blocked.threads[0].is_alive()
    host.fail((1,), "broken")
    answer = blocked.join()[0]
    assert isinstance(answer, TicketAnswer) and answer.ticket == b"0/1/0"


def test_an_exchange_nobody_finishes_closes_with_a_zero_mean() -> None:
    coordinator, host, _ = make_group(islands=2)
    headers = Headers(coordinator)
    headers.start(0)
    headers.start(1)
    headers.join()
    host.fail((0, 1), "missing")
    assert coordinator.round == 1 and coordinator.stats.participants == [0]
    last = coordinator.last_closed
    assert last is not None and last.dropped == 2
    assert torch.equal(last.mean_payload, coordinator.codec.encode(torch.zeros(NUMEL)))


def test_the_previous_mean_is_released_when_a_round_is_fixed() -> None:
    """One mean held at a time: a retry of round 0 once round 1 is exchanging adopts."""
    coordinator, host, _ = make_group(islands=2)
    sha_before = coordinator.state_sha256()
    for round in (0, 1):
        headers = Headers(coordinator)
        headers.start(0)
        headers.start(1)
        headers.join()
        if round == 0:
            host.finish(payloads(coordinator.codec, [0, 1]))
            retried = coordinator.submit_header(0, 0, 1.0, sha_before)
            assert isinstance(retried, RoundAnswer) and retried.mean_payload is not None
    answer = coordinator.submit_header(0, 0, 1.0, sha_before)
    assert isinstance(answer, RoundAnswer) and answer.adopt is not None
    assert coordinator.stats.adopted == 1


def test_a_mean_that_does_not_encode_drops_the_heaviest_participant() -> None:
    coordinator, host, _ = make_group(islands=3)
    headers = Headers(coordinator)
    for rank, weight in ((0, 1.0), (1, 5.0), (2, 2.0)):
        headers.start(rank, weight)
    headers.join()
    host.fail((), "aborted")
    assert dict(host.spec.weights) == {0: 1.0, 2: 2.0}
