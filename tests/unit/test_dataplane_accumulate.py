"""The lockstep accumulator: bit-identical to weighted_mean of decoded payloads, chunk by chunk.

Readers here are in memory (no sockets): the same `ChunkReader` protocol the server's
connections satisfy. tests/integration/test_dataplane.py runs it over real sockets.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from diloco.aggregate import weighted_mean
from diloco.codecs import CODECS, build_codec
from diloco.codecs.base import HEADER_BYTES, Codec
from diloco.transports.dataplane.accumulate import (
    Contribution,
    LockstepAccumulator,
    ParticipantFailed,
)
from diloco.transports.dataplane.codec_chunks import chunk_codec, decodes_finite
from diloco.transports.dataplane.framing import ExchangeAborted, ExchangeRefused, StreamError
from diloco.transports.dataplane.lockstep import LockstepExchange
from diloco.transports.dataplane.tickets import Ticket, TicketFields

pytestmark = pytest.mark.timeout(30)

FP32_MAX = float(torch.finfo(torch.float32).max)


class MemoryReader:
    """A payload in memory, read in the pieces asked for; records them in `log`."""

    def __init__(
        self, payload: torch.Tensor, name: int = 0, log: list[tuple[int, int]] | None = None
    ):
        self.data, self.position, self.name = payload.numpy().tobytes(), 0, name
        self.log = log if log is not None else []

    def read_into(self, view: memoryview) -> None:
        end = self.position + len(view)
        if end > len(self.data):
            raise StreamError("broken", f"closed after {len(self.data)} bytes")
        view[:] = self.data[self.position : end]
        self.position = end
        self.log.append((self.name, len(view)))


def _payloads(codec: Codec, numel: int, count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scales = [1e-3, 0.5, 3.0, 1e-2]
    return [
        codec.encode(torch.randn(numel, generator=generator) * scales[i % 4]) for i in range(count)
    ]


def _contributions(payloads: list[torch.Tensor], weights: list[float]) -> list[Contribution]:
    return [
        Contribution(rank, w, MemoryReader(p, rank))
        for rank, (w, p) in enumerate(zip(weights, payloads, strict=True))
    ]


CASES = [(2573, 2, [1.0, 3.0]), (5003, 3, [7.0, 1.0, 1000.0]), (4099, 4, [0.7, 2.0, 5.0, 1.3])]


@pytest.mark.parametrize("codec_name", sorted(CODECS))
@pytest.mark.parametrize(("numel", "count", "weights"), CASES)
@pytest.mark.parametrize("block_size", [256, 7])
def test_encoded_mean_is_bit_identical_to_weighted_mean_then_encode(
    codec_name: str, numel: int, count: int, weights: list[float], block_size: int
) -> None:
    codec = build_codec(codec_name, block_size=block_size)
    payloads = _payloads(codec, numel, count, seed=numel + count)
    decoded = [codec.decode(p, numel) for p in payloads]
    expected_mean = weighted_mean(decoded, weights)
    # 1024 wire bytes: chunks of at most 1024 elements (whole blocks), so every case spans
    # several, for every codec.
    accumulator = LockstepAccumulator(codec, numel, chunk_bytes=1024)
    assert accumulator.chunk_elements < numel

    encoded = accumulator.encoded_mean(_contributions(payloads, weights))
    assert torch.equal(encoded, codec.encode(expected_mean))

    out_N = torch.full((numel,), float("nan"))
    accumulator.mean_into(_contributions(payloads, weights), out_N)
    assert torch.equal(out_N, expected_mean)


@pytest.mark.parametrize("fused", [True, False])
def test_int8_is_exact_with_and_without_the_one_pass_sums(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk's int8 contributions are summed in one pass (and the mean encoded in it) where
    that writes what torch writes (sum_kernels.fma_add_matches_torch), else decoded then
    added one at a time: the same bits either way."""
    from diloco.codecs import sum_kernels

    if fused and not sum_kernels.fma_add_matches_torch():
        pytest.skip("no one-pass sums on this machine")
    monkeypatch.setattr(sum_kernels, "fma_add_matches_torch", lambda: fused)
    calls: list[str] = []
    names = ("int8_weighted_sum_into", "int8_weighted_sum_encode_into")
    for name in names:
        kernel = getattr(sum_kernels, name)
        spy = lambda *args, _kernel=kernel, _name=name, **kwargs: (  # noqa: E731
            calls.append(_name) or _kernel(*args, **kwargs)
        )
        monkeypatch.setattr(sum_kernels, name, spy)
    codec, numel, weights = build_codec("int8", block_size=64), 20_011, [3.0, 1.0, 2.0]
    payloads = _payloads(codec, numel, 3, seed=9)
    expected = weighted_mean([codec.decode(p, numel) for p in payloads], weights)
    accumulator = LockstepAccumulator(codec, numel, chunk_bytes=4096)
    encoded = accumulator.encoded_mean(_contributions(payloads, weights))
    assert torch.equal(encoded, codec.encode(expected))
    chunks = -(-numel // accumulator.chunk_elements)
    # Per chunk, one call for all three contributions, the sums encoded as they are formed.
    assert calls == (["int8_weighted_sum_encode_into"] * chunks if fused else [])
    calls.clear()
    out_N = torch.full((numel,), float("nan"))
    accumulator.mean_into(_contributions(payloads, weights), out_N)
    assert torch.equal(out_N, expected)
    assert calls == (["int8_weighted_sum_into"] * chunks if fused else [])


@pytest.mark.parametrize("fused", [True, False])
def test_fp32_is_exact_with_and_without_the_one_pass_sums(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Codec none's chunks are summed in one pass too (sum_kernels.f32_weighted_sum_into,
    which says whether the sums are finite: no pass checks them) where that writes what torch
    writes, else added one island at a time: the same bits either way, and a non-finite
    contribution still refused by its rank."""
    from diloco.codecs import sum_kernels

    if fused and not sum_kernels.fma_add_matches_torch():
        pytest.skip("no one-pass sums on this machine")
    monkeypatch.setattr(sum_kernels, "fma_add_matches_torch", lambda: fused)
    calls: list[int] = []
    kernel = sum_kernels.f32_weighted_sum_into
    spy = lambda acc_n, x_ns, alphas: calls.append(len(x_ns)) or kernel(acc_n, x_ns, alphas)  # noqa: E731
    monkeypatch.setattr(sum_kernels, "f32_weighted_sum_into", spy)
    codec, numel, weights = build_codec("none"), 5003, [1.0, 2.0, 0.5]
    payloads = _payloads(codec, numel, 3, seed=4)
    expected = weighted_mean([codec.decode(p, numel) for p in payloads], weights)
    accumulator = LockstepAccumulator(codec, numel, chunk_bytes=4096)
    encoded = accumulator.encoded_mean(_contributions(payloads, weights))
    assert torch.equal(encoded, codec.encode(expected))
    chunks = -(-numel // accumulator.chunk_elements)
    assert calls == ([3] * chunks if fused else [])
    bad = payloads[1].clone()
    bad[HEADER_BYTES + 4 * 4001 : HEADER_BYTES + 4 * 4002] = torch.tensor([float("nan")]).view(
        torch.uint8
    )
    with pytest.raises(ParticipantFailed, match="island 1: .*non-finite") as failed:
        accumulator.encoded_mean(_contributions([payloads[0], bad, payloads[2]], weights))
    assert failed.value.reason == "refused"


@pytest.mark.parametrize("fused", [True, False])
def test_an_overflowing_mean_encoded_as_it_is_summed_is_refused_with_its_count(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the sums and the encoding are one pass, a sum that overflows is refused as
    encoding it would be: ValueError counting the non-finite values of the true sum."""
    from diloco.codecs import sum_kernels

    if fused and not sum_kernels.fma_add_matches_torch():
        pytest.skip("no one-pass sums on this machine")
    monkeypatch.setattr(sum_kernels, "fma_add_matches_torch", lambda: fused)
    codec, numel = build_codec("int8", block_size=4), 8
    chunked = chunk_codec(codec, numel)
    payload = codec.encode(torch.tensor([FP32_MAX * 127 / 128, 0, 0, 0, 1, 2, 3, 4]))
    prefix, section = payload[: chunked.prefix_bytes], payload[chunked.prefix_bytes :]
    out = torch.zeros(chunked.payload_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(nan or inf\) among 8"):
        chunked.mean_chunk(
            [prefix, prefix], [section, section], 0, [1.0, 1.0], torch.empty(numel),
            scratch_n=torch.empty(numel), encode_into=out,
        )  # fmt: skip


@pytest.mark.parametrize("chunk_bytes", [4096, 8192 + 256, 1 << 20])
def test_the_result_does_not_depend_on_the_chunk_size(chunk_bytes: int) -> None:
    codec, numel, weights = build_codec("none"), 30_011, [3.0, 1.0, 2.0]
    payloads = _payloads(codec, numel, 3, seed=1)
    expected = weighted_mean([codec.decode(p, numel) for p in payloads], weights)
    out_N = torch.empty(numel)
    LockstepAccumulator(codec, numel, chunk_bytes=chunk_bytes).mean_into(
        _contributions(payloads, weights), out_N
    )
    assert torch.equal(out_N, expected)


def test_zeros_sum_to_positive_zero_as_weighted_mean_does() -> None:
    codec, numel = build_codec("none"), 300
    payloads = [codec.encode(torch.full((numel,), -0.0)) for _ in range(2)]
    out_N = torch.empty(numel)
    LockstepAccumulator(codec, numel, chunk_bytes=4096).mean_into(
        _contributions(payloads, [1.0, 1.0]), out_N
    )
    expected = weighted_mean([codec.decode(p, numel) for p in payloads], [1.0, 1.0])
    assert torch.equal(out_N.view(torch.int32), expected.view(torch.int32))


def test_streams_are_read_in_lockstep_and_never_more_than_a_chunk_at_a_time() -> None:
    codec, numel = build_codec("int8"), 10_000
    payloads = _payloads(codec, numel, 3, seed=2)
    log: list[tuple[int, int]] = []
    contributions = [Contribution(r, 1.0, MemoryReader(p, r, log)) for r, p in enumerate(payloads)]
    accumulator = LockstepAccumulator(codec, numel, chunk_bytes=4096, prefetch=False)
    accumulator.encoded_mean(contributions)
    chunked = chunk_codec(codec, numel)
    # The three prefixes (header and scales), then chunk j of ranks 0, 1, 2, then chunk j + 1.
    assert log[:3] == [
        (0, chunked.prefix_bytes),
        (1, chunked.prefix_bytes),
        (2, chunked.prefix_bytes),
    ]
    chunks = log[3:]
    assert [rank for rank, _ in chunks] == [0, 1, 2] * (len(chunks) // 3)
    assert max(size for _, size in chunks) <= accumulator.chunk_elements  # int8: 1 byte each
    assert all(
        r.position == p.numel()
        for r, p in zip((c.reader for c in contributions), payloads, strict=True)
    )  # type: ignore[attr-defined]


class GatedReader(MemoryReader):
    """Blocks its first section read (after the prefix) until `gate` is set."""

    def __init__(
        self, payload: torch.Tensor, name: int, log: list[tuple[int, int]], gate: threading.Event
    ):
        super().__init__(payload, name, log)
        self.gate = gate

    def read_into(self, view: memoryview) -> None:
        if self.position > 0:
            assert self.gate.wait(timeout=10)
        super().read_into(view)


def test_read_ahead_stays_within_two_chunks_of_the_slowest_stream() -> None:
    codec, numel = build_codec("int8"), 20_000
    payloads = _payloads(codec, numel, 2, seed=13)
    log: list[tuple[int, int]] = []
    gate = threading.Event()
    contributions = [
        Contribution(0, 1.0, GatedReader(payloads[0], 0, log, gate)),
        Contribution(1, 2.0, MemoryReader(payloads[1], 1, log)),
    ]
    accumulator = LockstepAccumulator(codec, numel, chunk_bytes=4096, prefetch=True)
    result: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: result.append(accumulator.encoded_mean(contributions)))
    thread.start()
    # Island 0 is stalled on its first chunk; island 1's reader runs ahead, by two chunks only.
    limit = time.monotonic() + 10
    while sum(1 for rank, _ in log if rank == 1) < 1 + 2 and time.monotonic() < limit:
        time.sleep(0.01)
    time.sleep(0.2)
    assert sum(1 for rank, _ in log if rank == 1) == 1 + 2  # its prefix and two chunks
    gate.set()
    thread.join(timeout=10)
    expected = codec.encode(weighted_mean([codec.decode(p, numel) for p in payloads], [1.0, 2.0]))
    assert torch.equal(result[0], expected)


def test_a_truncated_stream_fails_its_participant() -> None:
    codec, numel = build_codec("int8"), 5000
    payloads = _payloads(codec, numel, 3, seed=3)
    payloads[1] = payloads[1][:-100]
    with pytest.raises(ParticipantFailed, match="island 1: closed after") as caught:
        LockstepAccumulator(codec, numel, chunk_bytes=4096).encoded_mean(
            _contributions(payloads, [1.0, 1.0, 1.0])
        )
    assert (caught.value.rank, caught.value.reason) == (1, "broken")


def test_a_payload_of_another_codec_is_refused_before_any_chunk() -> None:
    numel = 5000
    payloads = _payloads(build_codec("int8"), numel, 2, seed=4)
    payloads[1] = _payloads(build_codec("fp8"), numel, 1, seed=5)[0]
    with pytest.raises(ParticipantFailed, match="island 1: int8 payload header") as caught:
        LockstepAccumulator(build_codec("int8"), numel).encoded_mean(
            _contributions(payloads, [1.0, 1.0])
        )
    assert caught.value.reason == "refused"


def test_negative_scales_are_refused() -> None:
    codec, numel = build_codec("int8"), 1000
    payloads = _payloads(codec, numel, 2, seed=6)
    payloads[0][HEADER_BYTES : HEADER_BYTES + 4].view(torch.float32)[0] = -1.0
    with pytest.raises(ParticipantFailed, match="island 0: int8 payload holds negative"):
        LockstepAccumulator(codec, numel).encoded_mean(_contributions(payloads, [1.0, 1.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_is_traced_to_its_participant(bad: float) -> None:
    codec, numel = build_codec("none"), 5000
    payloads = _payloads(codec, numel, 3, seed=7)
    payloads[2][HEADER_BYTES:].view(torch.float32)[3210] = bad  # bytes the encoder refuses
    with pytest.raises(ParticipantFailed, match=r"island 2: .* 1 non-finite value\(s\)") as caught:
        LockstepAccumulator(codec, numel, chunk_bytes=4096).encoded_mean(
            _contributions(payloads, [1.0, 1.0, 1.0])
        )
    assert caught.value.reason == "refused"


@pytest.mark.parametrize(
    ("codec_name", "proves"),
    [("int8", True), ("fp4", True), ("topk", True), ("fp8", False), ("none", False)],
)
def test_a_prefix_proves_finite_values_only_where_it_can(codec_name: str, proves: bool) -> None:
    codec, numel = build_codec(codec_name), 3000
    payload = _payloads(codec, numel, 1, seed=14)[0]
    chunked = chunk_codec(codec, numel)
    assert chunked.finite_by_prefix(payload[: chunked.prefix_bytes]) is proves
    assert decodes_finite(codec, payload, numel)


def test_a_scale_too_large_for_every_code_falls_back_to_decoding() -> None:
    """A hostile int8 payload: code -128 (the encoder writes -127..127) times a scale with
    127 x scale finite but 128 x scale not."""
    codec, numel = build_codec("int8"), 3000
    payload = _payloads(codec, numel, 1, seed=15)[0]
    chunked = chunk_codec(codec, numel)
    payload[HEADER_BYTES : HEADER_BYTES + 4].view(torch.float32)[0] = FP32_MAX / 127.5
    prefix = payload[: chunked.prefix_bytes]
    assert not chunked.finite_by_prefix(prefix)
    assert decodes_finite(codec, payload, numel)  # codes -127..127: still finite
    payload[chunked.prefix_bytes] = 128  # the first code: -128 as int8
    assert not decodes_finite(codec, payload, numel)


def test_a_topk_payload_with_a_nan_value_is_not_finite() -> None:
    codec, numel = build_codec("topk"), 3000
    payload = _payloads(codec, numel, 1, seed=16)[0]
    chunked = chunk_codec(codec, numel)
    payload[HEADER_BYTES : HEADER_BYTES + 2].view(torch.float16)[0] = float("nan")
    assert not chunked.finite_by_prefix(payload[: chunked.prefix_bytes])
    assert not decodes_finite(codec, payload, numel)


def test_a_topk_index_beyond_its_block_is_refused() -> None:
    codec, numel = build_codec("topk", block_size=16), 160
    payloads = _payloads(codec, numel, 2, seed=8)
    chunked = chunk_codec(codec, numel)
    payloads[1][chunked.prefix_bytes] = 200  # an index of block 0, which holds 16
    with pytest.raises(ParticipantFailed, match="island 1: topk payload holds an index beyond"):
        LockstepAccumulator(codec, numel).encoded_mean(_contributions(payloads, [1.0, 1.0]))


@pytest.mark.parametrize(
    ("ranks", "weights", "message"),
    [
        ([1, 0], [1.0, 1.0], r"strictly increasing rank order, got \[1, 0\]"),
        ([0, 1], [1.0, 0.0], r"weights must be finite and > 0, got \[1.0, 0.0\]"),
        ([0, 1], [1.0, float("nan")], "weights must be finite and > 0"),
        ([], [], "nothing to average"),
    ],
)
def test_bad_weights_or_order_are_refused(
    ranks: list[int], weights: list[float], message: str
) -> None:
    codec, numel = build_codec("none"), 10
    payloads = _payloads(codec, numel, len(ranks), seed=9)
    contributions = [
        Contribution(r, w, MemoryReader(p))
        for r, w, p in zip(ranks, weights, payloads, strict=True)
    ]
    with pytest.raises(ValueError, match=message):
        LockstepAccumulator(codec, numel).encoded_mean(contributions)


def test_an_unknown_codec_has_no_chunked_form() -> None:
    class Odd:
        name = "odd"

    with pytest.raises(ValueError, match="codec 'odd' has no chunked form"):
        chunk_codec(Odd(), 10)  # type: ignore[arg-type]


# --- LockstepExchange: the server's sink for one group --------------------------------------


def _ticket(island: int, size: int) -> Ticket:
    fields = TicketFields(island=island, round=0, payload_bytes=size)
    return Ticket(bytes([island]) * 16, fields, 0, bytes(32))


def _connect_all(
    exchange: LockstepExchange, readers: dict[int, MemoryReader], size: int
) -> dict[int, object]:
    answers: dict[int, object] = {}

    def connect(rank: int) -> None:
        try:
            answers[rank] = exchange.on_payload(_ticket(rank, size), readers[rank])
        except Exception as error:  # collected and checked by the test
            answers[rank] = error

    threads = [threading.Thread(target=connect, args=(rank,)) for rank in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    return answers


def test_every_participant_gets_the_encoded_mean() -> None:
    codec, numel, weights = build_codec("int8"), 3000, {0: 1.0, 1: 2.0, 2: 3.0}
    payloads = _payloads(codec, numel, 3, seed=10)
    exchange = LockstepExchange(LockstepAccumulator(codec, numel), weights, deadline=1e18)
    readers = {rank: MemoryReader(payloads[rank], rank) for rank in weights}
    answers = _connect_all(exchange, readers, payloads[0].numel())
    expected = codec.encode(
        weighted_mean([codec.decode(p, numel) for p in payloads], [1.0, 2.0, 3.0])
    )
    for rank in weights:
        assert isinstance(answers[rank], torch.Tensor) and torch.equal(answers[rank], expected)  # type: ignore[arg-type]
    outcome = exchange.outcome(0)
    assert outcome is not None and outcome.failure is None


def test_answers_are_sent_once_every_participant_is_answered() -> None:
    """What the coordinator's outer step waits for (grpc/state_keeper.py)."""
    codec, numel, weights = build_codec("none"), 100, {0: 1.0, 1: 1.0}
    payloads = _payloads(codec, numel, 2, seed=13)
    exchange = LockstepExchange(LockstepAccumulator(codec, numel), weights, deadline=1e18)
    assert not exchange.answers_sent(0.0)
    _connect_all(exchange, {rank: MemoryReader(payloads[rank]) for rank in weights}, 420)
    assert not exchange.answers_sent(0.05)  # the mean exists; nobody was answered yet
    exchange.answered(_ticket(1, 420))
    assert not exchange.answers_sent(0.0)
    later = threading.Timer(0.05, exchange.answered, args=(_ticket(0, 420),))
    later.start()
    assert exchange.answers_sent(10.0)  # woken by the last answer, not by the timeout
    later.join()


def test_a_failed_exchange_has_no_answers_to_wait_for() -> None:
    codec, numel = build_codec("none"), 100
    exchange = LockstepExchange(LockstepAccumulator(codec, numel), {0: 1.0}, deadline=1e18)
    exchange.abort("the coordinator stops")
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(exchange.answers_sent(600.0)))
    waiter.start()
    waiter.join(timeout=10)  # at once, not after 600 s: no mean will ever be sent
    assert got == [False]


def test_a_participant_that_never_connects_aborts_the_exchange_at_the_deadline() -> None:
    codec, numel = build_codec("none"), 100
    payloads = _payloads(codec, numel, 3, seed=11)
    clock = [0.0]
    exchange = LockstepExchange(
        LockstepAccumulator(codec, numel),
        {0: 1.0, 1: 1.0, 2: 1.0},
        deadline=5.0,
        clock=lambda: clock[0],
    )
    answers: dict[int, object] = {}
    thread = threading.Thread(
        target=lambda: answers.update(r=_connect_all(exchange, {0: MemoryReader(payloads[0])}, 420))
    )
    thread.start()
    assert exchange.outcome(timeout_s=-1) is None  # still waiting
    clock[0] = 6.0
    thread.join(timeout=10)
    assert isinstance(answers["r"][0], ExchangeAborted)  # type: ignore[index]
    outcome = exchange.outcome(0)
    assert outcome is not None and outcome.failure is not None
    assert (outcome.failure.rank, outcome.failure.reason) == (1, "missing")
    assert "island(s) [1, 2] never connected" in str(outcome.failure)


def test_strangers_and_second_connections_are_refused() -> None:
    codec, numel = build_codec("none"), 100
    exchange = LockstepExchange(LockstepAccumulator(codec, numel), {0: 1.0, 1: 1.0}, deadline=1e18)
    with pytest.raises(ExchangeRefused, match="island 5 is not in this group"):
        exchange.on_payload(_ticket(5, 420), MemoryReader(torch.zeros(420, dtype=torch.uint8)))
    exchange._readers[0] = MemoryReader(torch.zeros(420, dtype=torch.uint8))  # 0 is connected
    with pytest.raises(ExchangeRefused, match="island 0 is already connected"):
        exchange.on_payload(_ticket(0, 420), MemoryReader(torch.zeros(420, dtype=torch.uint8)))


def test_a_failing_participant_aborts_everyone_and_is_named() -> None:
    codec, numel = build_codec("int8"), 3000
    payloads = _payloads(codec, numel, 2, seed=12)
    payloads[1] = payloads[1][:500]
    exchange = LockstepExchange(LockstepAccumulator(codec, numel), {0: 1.0, 1: 1.0}, deadline=1e18)
    readers = {rank: MemoryReader(payloads[rank], rank) for rank in (0, 1)}
    answers = _connect_all(exchange, readers, 3000)
    assert all(isinstance(answers[rank], ExchangeAborted) for rank in (0, 1))
    assert "island 1: closed after" in str(answers[0])
    outcome = exchange.outcome(0)
    assert outcome is not None and outcome.failure is not None and outcome.failure.rank == 1


def test_a_chunk_is_sized_by_each_participants_wire_bytes() -> None:
    """`chunk_bytes` counts each participant's wire bytes: an int8 chunk holds 4x the
    elements of an fp32 one for the same buffer, and no chunk more elements than chunk_bytes
    (its fp32 working copies at most 4x chunk_bytes)."""
    numel, chunk_bytes = 1 << 20, 64 << 10
    elements = {
        name: LockstepAccumulator(build_codec(name), numel, chunk_bytes=chunk_bytes).chunk_elements
        for name in ("none", "bf16", "int8", "fp4")
    }
    assert elements["none"] == chunk_bytes // 4
    assert elements["bf16"] == chunk_bytes // 2
    assert elements["int8"] == chunk_bytes  # its scales come first, in the prefix
    assert elements["fp4"] == chunk_bytes  # half a byte each: capped by the element count
    for name, count in elements.items():
        chunked = chunk_codec(build_codec(name), numel)
        assert chunked.section_offset(count) - chunked.section_offset(0) <= chunk_bytes
