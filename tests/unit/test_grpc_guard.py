"""The grpc coordinator's guards, one by one: header checks, stream watchdog, call limits, what
a receiver allocates, and which failures an island retries. No sockets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from diloco.codecs import build_codec
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc.client import GrpcTransport
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.guard import (
    CallLimits,
    StreamCut,
    StreamWatchdog,
    check_average_header,
    check_weight,
    transfer_s,
)
from diloco.transports.grpc.rounds import RefusedPayload, RoundRules
from diloco.transports.grpc.wire import check_specs, receive_bytes

pytestmark = pytest.mark.timeout(30)

RULES = RoundRules(run_id="run", rounds=10, islands=3, min_islands=1)


def header(**overrides: Any) -> pb.AverageHeader:
    fields: dict[str, Any] = dict(
        run_id="run", rank=1, round=2, weight=100.0, params_sha256="a" * 64, payload_bytes=10
    )
    fields.update(overrides)
    return pb.AverageHeader(**fields)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e19])
def test_check_weight_refuses_what_is_not_finite_tokens(weight: float) -> None:
    with pytest.raises(RefusedPayload, match=r"weight must be finite tokens in \(0, 1e\+18\]"):
        check_weight(weight)


def test_check_weight_takes_positive_finite_tokens() -> None:
    for weight in (5e-324, 1.0, 4096.0, 1e18):
        check_weight(weight)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"rank": -1}, "rank -1 is outside [0, 3)"),
        ({"rank": 3}, "rank 3 is outside [0, 3)"),
        ({"round": -1}, "round -1 is outside [0, 10]"),
        ({"round": 11}, "round 11 is outside [0, 10]"),
        ({"weight": float("nan")}, "got nan"),
        ({"payload_bytes": -5}, "payload_bytes must be >= 0"),
        ({"params_sha256": "a" * 64 + "\n"}, "sha256 hex digest, got 'aaaa"),
        ({"params_sha256": "A" * 64}, "sha256 hex digest"),
        ({"metrics": {"loss\n": 1.0}}, "metric names are [a-z0-9_], got 'loss\\n'"),
        ({"metrics": {"loss": float("inf")}}, "metric 'loss' must be finite"),
        ({"metrics": {f"m{i}": 1.0 for i in range(17)}}, "at most 16 metrics"),
    ],
)
def test_check_average_header_refuses_each_field_out_of_range(
    overrides: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(RefusedPayload) as error:
        check_average_header(header(**overrides), RULES, islands_round=2)
    assert fragment in str(error.value)


def test_check_average_header_takes_a_valid_header_and_a_round_past_the_last() -> None:
    check_average_header(header(params_sha256=""), RULES, islands_round=2)
    check_average_header(header(round=12), RULES, islands_round=12)  # a resumed, longer run


def test_transfer_s_is_the_idle_time_plus_the_bytes_at_the_slowest_rate() -> None:
    assert transfer_s(0, 2.0) == 2.0
    assert transfer_s(10**6, 2.0) == 3.0


# -- receiving bytes --------------------------------------------------------------------------


class FakeWatch:
    def __init__(self, cut: bool = False) -> None:
        self.touched = 0
        self.moved = 0
        self.cut = cut

    def touch(self, nbytes: int = 0) -> None:
        self.touched += 1
        self.moved += nbytes


def data(*pieces: bytes) -> Iterator[pb.Chunk]:
    return iter([pb.Chunk(data=piece) for piece in pieces])


def test_receive_bytes_counts_only_chunks_that_carry_bytes() -> None:
    watch = FakeWatch()
    got = receive_bytes(data(b"ab", b"", b"", b"cd"), 4, "payload", watch)
    assert bytes(got.numpy()) == b"abcd" and watch.touched == 2 and watch.moved == 4


def test_receive_bytes_does_not_allocate_an_unchecked_declared_size() -> None:
    """Issue 12, item 7: `numel=10**12` raised MemoryError before anything was checked."""
    with pytest.raises(ValueError, match="3 bytes arrived of the 4000000000000 announced"):
        receive_bytes(data(b"abc"), 4 * 10**12, "anchor", grow=True)
    grown = receive_bytes(data(b"x" * 700, b"y" * 700), 1400, "anchor", grow=True)
    assert bytes(grown.numpy()) == b"x" * 700 + b"y" * 700


def test_receive_bytes_refuses_more_than_announced_or_another_kind() -> None:
    with pytest.raises(ValueError, match="more than the 2 bytes announced"):
        receive_bytes(data(b"abc"), 2, "payload")
    with pytest.raises(ValueError, match="expected data, got average"):
        receive_bytes(iter([pb.Chunk(average=header())]), 2, "payload")


def test_a_stream_the_watchdog_cut_raises_stream_cut_not_a_refusal() -> None:
    with pytest.raises(StreamCut, match="payload: cut after 2 of 4 bytes"):
        receive_bytes(data(b"ab"), 4, "payload", FakeWatch(cut=True))


def test_check_specs_refuses_a_name_with_a_trailing_newline() -> None:
    state = pb.StateHeader(
        numel=4,
        tensors=[
            pb.TensorSpec(name="anchor", dtype="float32", numel=4),
            pb.TensorSpec(name="momentum\n", dtype="float32", numel=4),
        ],
    )
    with pytest.raises(ValueError, match=r"'momentum\\n' of dtype 'float32' is not allowed"):
        check_specs(state)


# -- the watchdog and the call limits ---------------------------------------------------------


class FakeContext:
    def __init__(self) -> None:
        self.cancelled_at: float | None = None

    def cancel(self) -> None:
        self.cancelled_at = time.monotonic()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1\nforged"


def test_the_watchdog_cuts_an_idle_stream_and_one_past_its_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watchdog = StreamWatchdog(period_s=0.01)
    idle, busy, late = FakeContext(), FakeContext(), FakeContext()
    try:
        with (
            watchdog.watch(idle, "Average", idle_s=0.5, total_s=10) as idle_watch,
            watchdog.watch(busy, "Average", idle_s=0.5, total_s=10) as busy_watch,
            watchdog.watch(late, "GetState", idle_s=10, total_s=0.5) as late_watch,
        ):
            started = time.monotonic()
            while time.monotonic() - started < 0.8:  # bytes keep moving on `busy`
                busy_watch.touch()
                time.sleep(0.01)
            assert idle_watch.cut and late_watch.cut and not busy_watch.cut
        assert busy.cancelled_at is None
        assert idle.cancelled_at is not None and late.cancelled_at is not None
        assert watchdog.cancelled == 2
    finally:
        watchdog.close()
    assert "from 'ipv4:127.0.0.1:1\\nforged': idle for 0.5 s" in caplog.text
    assert "past its deadline" in caplog.text


def test_the_watchdog_cuts_a_trickle_once_the_idle_time_has_passed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 12, item 2: one byte at a time is never idle; past its first idle_s, a stream
    must keep up MIN_BYTES_PER_S on average, whatever its total deadline."""
    watchdog = StreamWatchdog(period_s=0.01)
    trickle, honest = FakeContext(), FakeContext()
    try:
        with (
            watchdog.watch(trickle, "Average", 0.5, 100.0, 1e6) as trickle_watch,
            watchdog.watch(honest, "Average", 0.5, 100.0, 1e6) as honest_watch,
        ):
            started = time.monotonic()
            while not trickle_watch.cut and time.monotonic() - started < 5:
                trickle_watch.touch(1)
                honest_watch.touch(100_000)  # 10 MB/s
                time.sleep(0.01)
            assert trickle_watch.cut and not honest_watch.cut
        assert trickle.cancelled_at is not None and honest.cancelled_at is None
    finally:
        watchdog.close()
    assert "slower than 1e+06 bytes/s" in caplog.text


def test_call_limits_bound_each_rank_and_the_total() -> None:
    limits = CallLimits(per_rank={"Average": 2}, total={"Average": 3})
    assert limits.try_acquire("Average", 0) and limits.try_acquire("Average", 0)
    assert not limits.try_acquire("Average", 0)  # the rank's bound
    assert limits.try_acquire("Average", 1)
    assert not limits.try_acquire("Average", 2)  # the total's bound
    assert limits.refused == 2 and limits.peak[("Average", 0)] == 2
    limits.release("Average", 0)
    assert limits.in_flight("Average", 0) == 1 and limits.try_acquire("Average", 2)


# -- the island retries a stream the coordinator cut ------------------------------------------


class Cancelled(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "the stream was cut: idle or too slow"


def test_an_island_retries_a_call_whose_stream_the_coordinator_cut() -> None:
    settings = GrpcTransportConfig(address="127.0.0.1:9", insecure=True, retry_s=5)
    transport = GrpcTransport(
        settings, run_id="run", token="t" * 16, codec=build_codec("none"), numel=4, rank=0,
        num_islands=1,
    )  # fmt: skip
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise Cancelled()
        return "answer"

    try:
        assert transport._retrying("averaging round 0", call) == "answer"
    finally:
        transport._channel.close()
    assert len(calls) == 2
