"""The coordinator's grpc service: the wire side of `RoundBook`, and a server to host it.

Streams carry a header message, then the bytes in chunks of CHUNK_BYTES, so no message comes
near grpc's size limits whatever the model size. Errors map to grpc status codes the island
turns into clear messages: UNAUTHENTICATED (token), FAILED_PRECONDITION (another model or run),
INVALID_ARGUMENT (a refused payload), UNAVAILABLE (not ready: retry).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import torch

from diloco.config.schema import GrpcTransportConfig
from diloco.transports.base import GroupMismatchError, SharedState
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.rounds import NotReady, RefusedPayload, RoundAnswer, RoundBook
from diloco.transports.grpc.security import TokenInterceptor, server_credentials

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
# Headroom over one chunk plus its framing.
MAX_MESSAGE_BYTES = 2 * CHUNK_BYTES
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def chunks_of(buffer: torch.Tensor) -> Iterator[pb.Chunk]:
    """`buffer`'s bytes (a contiguous CPU tensor) as data chunks."""
    view = memoryview(buffer.contiguous().view(torch.uint8).numpy().data)
    for start in range(0, len(view), CHUNK_BYTES):
        yield pb.Chunk(data=bytes(view[start : start + CHUNK_BYTES]))


def receive_bytes(chunks: Iterator[pb.Chunk], size: int, what: str) -> torch.Tensor:
    """Exactly `size` bytes from data chunks into one uint8 tensor; ValueError otherwise."""
    out = np.empty(size, dtype=np.uint8)
    filled = 0
    for chunk in chunks:
        if chunk.WhichOneof("kind") != "data":
            raise ValueError(f"{what}: expected data, got {chunk.WhichOneof('kind')}")
        end = filled + len(chunk.data)
        if end > size:
            raise ValueError(f"{what}: more than the {size} bytes announced")
        out[filled:end] = np.frombuffer(chunk.data, dtype=np.uint8)
        filled = end
        if filled == size:
            break
    if filled != size:
        raise ValueError(f"{what}: {filled} bytes arrived of the {size} announced (truncated)")
    return torch.from_numpy(out)


def state_chunks(header: pb.StateHeader, state: SharedState | None) -> Iterator[pb.Chunk]:
    yield pb.Chunk(state=header)
    if state is not None and not header.same:
        yield from chunks_of(state.anchor.to(torch.float32))
        yield from chunks_of(state.momentum.to(torch.float32))


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, book: RoundBook):
        self.book = book

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        try:
            round, has_state = self.book.join(
                request.rank, request.run_id, dict(request.fingerprint)
            )
        except GroupMismatchError as error:
            log.error("refused a join: %s", error)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return pb.JoinReply(
            round=round, has_state=has_state, islands_active=self.book.active_islands()
        )

    def Average(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "average":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an Average call starts with a header")
        assert first is not None  # abort raised
        header = first.average
        if header.run_id != self.book.rules.run_id:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run_id {header.run_id!r} is not this coordinator's {self.book.rules.run_id!r}",
            )
        expected = self.book.codec.payload_bytes(self.book.numel) if self.book.numel else 0
        delta = None
        # A payload for another round never reaches a mean: it is not even decoded.
        if header.round == self.book.round:
            try:
                if header.payload_bytes != expected:
                    raise RefusedPayload(
                        f"the payload announces {header.payload_bytes} bytes; a "
                        f"{self.book.codec.name} payload of {self.book.numel} elements has "
                        f"{expected}"
                    )
                payload = receive_bytes(request_iterator, header.payload_bytes, "payload")
                delta = self.book.decode(payload)
            except NotReady as error:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
            except (RefusedPayload, ValueError) as error:
                self.book.refuse(header.rank, str(error))
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"payload refused: {error}")
        try:
            answer = self.book.submit(
                header.rank, header.round, header.weight, header.params_sha256, delta
            )
        except NotReady as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        except RefusedPayload as error:
            self.book.refuse(header.rank, str(error))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"payload refused: {error}")
        yield from _answer_chunks(answer)

    def GetState(
        self, request: pb.StateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        state = self.book.state()
        if state is None:
            yield pb.Chunk(state=pb.StateHeader(has_state=False))
            return
        sha = self.book.state_sha256()
        same = request.round == state.round and request.params_sha256 == sha
        header = pb.StateHeader(
            round=state.round,
            numel=state.anchor.numel(),
            params_sha256=sha,
            has_state=True,
            same=same,
        )
        yield from state_chunks(header, state)

    def PutState(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> pb.PutStateReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "state":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PutState starts with a header")
        assert first is not None  # abort raised
        header = first.state
        if header.run_id != self.book.rules.run_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "PutState for another run_id")
        if self.book.has_state():
            return pb.PutStateReply(accepted=False, round=self.book.round)
        try:
            numel = header.numel
            anchor = receive_bytes(request_iterator, 4 * numel, "anchor").view(torch.float32)
            momentum = receive_bytes(request_iterator, 4 * numel, "momentum").view(torch.float32)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if not (torch.isfinite(anchor).all() and torch.isfinite(momentum).all()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the state holds non-finite values")
        accepted = self.book.seed(SharedState(header.round, anchor, momentum))
        return pb.PutStateReply(accepted=accepted, round=self.book.round)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        if request.run_id == self.book.rules.run_id:
            self.book.leave(request.rank)
        return pb.LeaveReply()


def _answer_chunks(answer: RoundAnswer) -> Iterator[pb.Chunk]:
    if answer.adopt is not None:
        state = answer.adopt
        yield pb.Chunk(
            reply=pb.AverageReply(
                round=state.round,
                participants=answer.participants,
                params_sha256=answer.params_sha256,
                payload_bytes=8 * state.anchor.numel(),
                adopt=True,
            )
        )
        yield from chunks_of(state.anchor)
        yield from chunks_of(state.momentum)
        return
    assert answer.mean_payload is not None
    yield pb.Chunk(
        reply=pb.AverageReply(
            round=answer.round,
            participants=answer.participants,
            params_sha256=answer.params_sha256,
            payload_bytes=answer.mean_payload.numel(),
            late=answer.late,
        )
    )
    yield from chunks_of(answer.mean_payload.cpu())


class CoordinatorServer:
    """A running coordinator: the grpc server and the thread that enforces deadlines."""

    def __init__(self, book: RoundBook, settings: GrpcTransportConfig, token: str):
        self.book = book
        self.refused_calls = 0
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16 + 4 * book.rules.islands),
            interceptors=[TokenInterceptor(token, self._on_refused)],
            options=CHANNEL_OPTIONS,
        )
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(book), self._server)
        address = settings.listen or settings.address
        credentials = server_credentials(settings)
        try:
            if credentials is None:
                log.warning("the coordinator at %s runs WITHOUT TLS (grpc.insecure)", address)
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise OSError(f"the coordinator cannot listen on {address}: {error}") from None
        if port == 0:
            raise OSError(f"the coordinator cannot listen on {address} (in use?)")
        self.port = port
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="deadline", daemon=True)

    def start(self) -> CoordinatorServer:
        self._server.start()
        self._ticker.start()
        log.info("coordinator listening on port %d", self.port)
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        self._stop.set()
        self.book.stop()
        self._server.stop(grace_s).wait()

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            self.book.tick()

    def _on_refused(self, method: Any) -> None:
        self.refused_calls += 1
        log.warning("refused a call to %s: wrong or missing run token", method)
