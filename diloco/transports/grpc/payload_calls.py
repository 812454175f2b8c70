"""The wire side of an island's payload: the Exchange call (its header only: the bytes travel
on the data plane) and the Average call (the bytes on the grpc stream).

The header is checked before anything else (run, rank, round, weight, size:
`guard.check_average_header`). Exchange answers with a ticket for the data plane once the
round's participants are fixed (grpc/exchanges.py). Average reads the payload chunk by chunk
under the stream watchdog, decodes and checks it (`Coordinator.decode`), and hands it to the
coordinator of the caller's lane: with a data plane, as a participant of the round's exchange
from this process (`DataPlaneHost.deliver`). An answer that is not a ticket (the round's mean,
late, or the state to adopt) streams back on grpc from one copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import grpc
import torch

from diloco.transports.dataplane.framing import DataPlaneError
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc.aborts import abort, first_chunk
from diloco.transports.grpc.coordinator import Coordinator, RoundAnswer
from diloco.transports.grpc.dataplane_host import DataPlaneHost
from diloco.transports.grpc.exchanges import RefusedOnDataPlane, TicketAnswer
from diloco.transports.grpc.guard import (
    MIN_BYTES_PER_S,
    StreamCut,
    StreamWatch,
    StreamWatchdog,
    check_average_header,
    check_metrics,
    transfer_s,
)
from diloco.transports.grpc.rounds import NotReady, RefusedPayload
from diloco.transports.grpc.state_keeper import StateChanged
from diloco.transports.grpc.wire import answer_parts, receive_bytes


class PayloadCalls:
    """What the service's payload calls do, given its watchdog and its stream timeouts.

    Args:
        watchdog: the service's stream watchdog.
        idle_s: transport.grpc.stream_idle_s.
        header_wait_s: how long a stream may take to send its header.
    """

    def __init__(self, watchdog: StreamWatchdog, idle_s: float, header_wait_s: float):
        self.watchdog, self.idle_s, self.header_wait_s = watchdog, idle_s, header_wait_s
        self.dataplane: DataPlaneHost | None = None
        """The coordinator's data plane (set by the server when it runs one)."""

    def exchange(
        self, coordinator: Coordinator, rank: int, header: pb.AverageHeader, context: Any
    ) -> Iterator[pb.Chunk]:
        """An Exchange call: a ticket for the data plane, or the answer of `send_answer`."""
        if coordinator.exchanges is None:
            abort(context, grpc.StatusCode.UNIMPLEMENTED, "no data plane here: use Average")
        with _refusals_end_the_call(coordinator, rank, context):
            check_header_of(coordinator, header, rank)
            if header.round == coordinator.round:
                expected_payload_bytes(coordinator, header)
            answer = coordinator.submit_header(
                rank,
                header.round,
                header.weight,
                header.params_sha256,
                wait_s=2 * coordinator.rules.deadline_ceiling_s,
            )
        ticketed = isinstance(answer, TicketAnswer)
        received = header.payload_bytes if ticketed else 0
        coordinator.note_metrics(rank, check_metrics(header.metrics), received)
        if not isinstance(answer, TicketAnswer):  # counted as it goes out (as Average's)
            coordinator.status_feed.answer(rank, answer)
            yield from self.send_answer(coordinator, answer, context)
            return
        reply = pb.AverageReply(
            round=answer.round,
            participants=answer.participants,
            payload_bytes=header.payload_bytes,
            ticket=answer.ticket,
            dataplane_port=answer.port,
        )
        yield pb.Chunk(reply=reply)

    def average(
        self,
        coordinator: Coordinator,
        rank: int,
        request_iterator: Iterator[pb.Chunk],
        context: grpc.ServicerContext,
    ) -> RoundAnswer:
        """Read an Average call's header and payload; the coordinator's answer."""
        first = first_chunk(
            self.watchdog, context, request_iterator, "Average", self.header_wait_s, "average"
        )
        header = first.average
        try:
            with _refusals_end_the_call(coordinator, rank, context):
                check_header_of(coordinator, header, rank)
                payload, delta = self._receive_payload(
                    coordinator, header, request_iterator, context
                )
                received = 0 if payload is None else payload.numel()
                if coordinator.exchanges is not None and payload is not None:
                    del delta  # checked; the exchange decodes the payload again, chunk by chunk
                    answer = self._exchange_in_process(coordinator, rank, header, payload)
                else:
                    answer = coordinator.submit(
                        rank,
                        header.round,
                        header.weight,
                        header.params_sha256,
                        delta,
                        wait_s=2 * coordinator.rules.deadline_ceiling_s,
                    )
        except StreamCut as error:
            abort(context, grpc.StatusCode.CANCELLED, f"the stream was cut: {error}")
        coordinator.note_metrics(rank, check_metrics(header.metrics), received)
        return answer

    def _exchange_in_process(
        self, coordinator: Coordinator, rank: int, header: pb.AverageHeader, payload: torch.Tensor
    ) -> RoundAnswer:
        """A payload that came on grpc, taking part in its round's data-plane exchange from
        this process; a new ticket whenever an attempt fails (as an island does)."""
        assert self.dataplane is not None
        wait_s = 2 * coordinator.rules.deadline_ceiling_s
        while True:
            answer = coordinator.submit_header(
                rank, header.round, header.weight, header.params_sha256, wait_s=wait_s
            )
            if not isinstance(answer, TicketAnswer):
                return answer
            try:
                mean_payload = self.dataplane.deliver(answer.ticket, payload)
            except DataPlaneError:  # aborted (another participant failed), or in use: again
                continue
            # The hash is not part of a fresh answer: it may still be being computed.
            return RoundAnswer(answer.round, answer.participants, "", mean_payload)

    def send_answer(
        self, coordinator: Coordinator, answer: RoundAnswer, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        """The answer's header, then its bytes: the mean, or the state to adopt, read from the
        keeper's one copy chunk by chunk (UNAVAILABLE if a round's step changes it meanwhile:
        the island sends again)."""
        head, data, nbytes = answer_parts(answer, coordinator.keeper.read_chunks)
        with self.moving(context, "answer", nbytes) as watch:
            yield head
            try:
                for chunk in data:
                    yield chunk
                    watch.touch(len(chunk.data))
            except StateChanged as error:
                abort(context, grpc.StatusCode.UNAVAILABLE, str(error))

    def moving(
        self, context: grpc.ServicerContext, what: str, nbytes: int
    ) -> AbstractContextManager[StreamWatch]:
        """The watch of a stream that moves `nbytes`: cut when idle, slower than the slowest
        link given time for, or past the time its bytes take at that rate."""
        total_s = transfer_s(nbytes, self.idle_s)
        return self.watchdog.watch(context, what, self.idle_s, total_s, MIN_BYTES_PER_S)

    def _receive_payload(
        self,
        coordinator: Coordinator,
        header: pb.AverageHeader,
        request_iterator: Iterator[pb.Chunk],
        context: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the payload of the open round, its decoded values); None, None for another round
        (its payload is never read)."""
        if header.round != coordinator.round:
            return None, None
        expected = expected_payload_bytes(coordinator, header)
        with self.moving(context, "Average", expected) as watch:
            payload = receive_bytes(request_iterator, expected, "payload", watch)
        return payload, coordinator.decode(payload)


def check_header_of(coordinator: Coordinator, header: pb.AverageHeader, rank: int) -> None:
    """Refuse a header of another run or rank, or with numbers out of range (RefusedPayload)."""
    if header.run_id != coordinator.rules.run_id:
        raise RefusedPayload(f"run_id {header.run_id[:64]!r} is not this coordinator's")
    if header.rank != rank:
        raise RefusedPayload(f"the header's rank {header.rank} is not the caller's {rank}")
    check_average_header(header, coordinator.rules, coordinator.round)


def expected_payload_bytes(coordinator: Coordinator, header: pb.AverageHeader) -> int:
    """The payload size of the lane's codec and model; RefusedPayload if the header says
    another."""
    numel = coordinator.numel
    expected = coordinator.codec.payload_bytes(numel) if numel else 0
    if header.payload_bytes != expected:
        raise RefusedPayload(
            f"the payload announces {header.payload_bytes} bytes; a "
            f"{coordinator.codec.name} payload of {numel} elements has {expected}"
        )
    return expected


@contextmanager
def _refusals_end_the_call(
    coordinator: Coordinator, rank: int, context: grpc.ServicerContext
) -> Iterator[None]:
    """What a payload call's refusals answer: not ready or timed out (UNAVAILABLE, the island
    retries), refused (INVALID_ARGUMENT, counted here unless its exchange counted it)."""
    try:
        yield
    except (NotReady, TimeoutError) as error:
        abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
    except RefusedOnDataPlane as error:  # counted when its exchange refused it
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"payload refused: {error}")
    except (RefusedPayload, ValueError) as error:
        coordinator.refuse(rank, str(error))
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"payload refused: {error}")
