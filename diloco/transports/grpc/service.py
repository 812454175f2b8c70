"""The coordinator's grpc service: the wire side of `Coordinator`, and a server to host it.

Streams carry a header message, then the bytes in chunks of CHUNK_BYTES, so no message comes
near grpc's size limits whatever the model size. Every call carries the run token (checked by
`security.TokenInterceptor`); every call but Join and Status also carries the caller's rank and
session in its metadata, checked before anything is read from the stream. Errors map to grpc
status codes the island turns into clear messages: UNAUTHENTICATED (token, session),
FAILED_PRECONDITION (another model or run, a rank held by another island), INVALID_ARGUMENT (a
refused payload), UNAVAILABLE (not ready: retry), RESOURCE_EXHAUSTED (too many calls: retry).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc
import torch

from diloco.shared_state import SharedState
from diloco.transports.base import GroupMismatchError
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.coordinator import Coordinator, NotAuthorized, RoundAnswer
from diloco.transports.grpc.guard import (
    MIN_BYTES_PER_S,
    CallLimits,
    StreamWatchdog,
    check_average_header,
    check_metrics,
)
from diloco.transports.grpc.rounds import NotReady, RefusedPayload
from diloco.transports.grpc.security import TokenInterceptor, server_credentials
from diloco.transports.grpc.state_keeper import CHUNK_BYTES, StateChanged
from diloco.transports.grpc.wire import (
    RANK_METADATA_KEY,
    SESSION_METADATA_KEY,
    chunks_of,
    receive_bytes,
    receive_state,
    spec_of,
)

log = logging.getLogger(__name__)

# Headroom over one chunk plus its framing.
MAX_MESSAGE_BYTES = 2 * CHUNK_BYTES
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
HEADER_WAIT_S = 10.0
"""How long a stream may take to send its first message (its header)."""


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, settings: GrpcTransportConfig):
        self.coordinator = coordinator
        self.settings = settings
        self.watchdog = StreamWatchdog()
        islands = coordinator.rules.islands
        self.limits = CallLimits(
            per_rank={"Average": 2, "GetState": 2, "PutState": 1},
            total={"Average": 4 * islands + 4, "GetState": islands + 4, "PutState": 2},
        )
        self.status_json: Callable[[], str] = lambda: "{}"

    # -- calls ------------------------------------------------------------------------------

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        try:
            round, has_state, session = self.coordinator.join(
                request.rank,
                request.run_id,
                dict(request.fingerprint),
                request.session,
                request.host,
            )
        except GroupMismatchError as error:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return pb.JoinReply(
            round=round,
            has_state=has_state,
            islands_active=self.coordinator.active_islands(),
            session=session,
        )

    def Average(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        rank = self._authorize(context)
        with self._held(context, "Average", rank):
            answer = self._average(rank, request_iterator, context)
            total_s = self._transfer_s(
                answer.mean_payload.numel() if answer.mean_payload is not None else 0
            )
            with self.watchdog.watch(
                context, "answer", self.settings.stream_idle_s, total_s
            ) as watch:
                for chunk in _answer_chunks(answer):
                    yield chunk
                    watch.touch()

    def GetState(
        self, request: pb.StateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        rank = self._authorize(context)
        with self._held(context, "GetState", rank):
            found = self.coordinator.download()
            if found is None:
                yield pb.Chunk(state=pb.StateHeader(has_state=False))
                return
            state, sha, data = found
            same = request.round == state.round and request.params_sha256 == sha
            yield pb.Chunk(state=_state_header(state, sha, same=same))
            if same:
                return
            total_s = self._transfer_s(
                sum(t.numel() * t.element_size() for _, t in state.tensors())
            )
            with self.watchdog.watch(
                context, "GetState", self.settings.stream_idle_s, total_s
            ) as watch:
                try:
                    for piece in data:
                        yield pb.Chunk(data=piece)
                        watch.touch()
                except StateChanged as error:
                    _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))

    def PutState(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> pb.PutStateReply:
        rank = self._authorize(context)
        with self._held(context, "PutState", rank):
            if self.coordinator.has_state():
                return pb.PutStateReply(accepted=False, round=self.coordinator.round)
            expected = self.coordinator.expected_numel()
            with self.watchdog.watch(context, "PutState", HEADER_WAIT_S, HEADER_WAIT_S) as watch:
                first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "state":
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "PutState starts with a header")
            header = first.state
            try:
                if header.run_id != self.coordinator.rules.run_id:
                    raise RefusedPayload(f"PutState for another run_id {header.run_id!r}")
                if expected is not None and header.numel != expected:
                    raise RefusedPayload(
                        f"the state has {header.numel} parameters, the group's model {expected}"
                    )
                total_s = self._transfer_s(8 * max(0, header.numel))
                with self.watchdog.watch(
                    context, "PutState", self.settings.stream_idle_s, total_s
                ) as watch:
                    state = receive_state(request_iterator, header, watch)
                accepted = self.coordinator.seed(rank, state)
            except (RefusedPayload, ValueError) as error:
                self.coordinator.refuse(rank, str(error))
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"state refused: {error}")
            return pb.PutStateReply(accepted=accepted, round=self.coordinator.round)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        rank = self._authorize(context)
        self.coordinator.leave(rank)
        return pb.LeaveReply()

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return pb.StatusReply(json=self.status_json())

    # -- helpers ----------------------------------------------------------------------------

    def _average(
        self, rank: int, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> RoundAnswer:
        coordinator = self.coordinator
        with self.watchdog.watch(context, "Average", HEADER_WAIT_S, HEADER_WAIT_S):
            first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "average":
            _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "an Average call starts with a header"
            )
        header = first.average
        try:
            if header.run_id != coordinator.rules.run_id:
                raise RefusedPayload(f"run_id {header.run_id!r} is not this coordinator's")
            if header.rank != rank:
                raise RefusedPayload(f"the header's rank {header.rank} is not the caller's {rank}")
            check_average_header(header, coordinator.rules, coordinator.round)
            delta = self._receive_payload(header, request_iterator, context)
            answer = coordinator.submit(
                rank,
                header.round,
                header.weight,
                header.params_sha256,
                delta,
                wait_s=2 * coordinator.rules.deadline_ceiling_s,
            )
        except NotReady as error:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
        except TimeoutError as error:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
        except (RefusedPayload, ValueError) as error:
            coordinator.refuse(rank, str(error))
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"payload refused: {error}")
        coordinator.note_metrics(rank, check_metrics(header.metrics), header.payload_bytes)
        return answer

    def _receive_payload(
        self, header: pb.AverageHeader, request_iterator: Iterator[pb.Chunk], context: Any
    ) -> torch.Tensor | None:
        """The decoded payload of the open round; None for another round (never decoded)."""
        coordinator = self.coordinator
        if header.round != coordinator.round:
            return None
        expected = coordinator.codec.payload_bytes(coordinator.numel) if coordinator.numel else 0
        if header.payload_bytes != expected:
            raise RefusedPayload(
                f"the payload announces {header.payload_bytes} bytes; a "
                f"{coordinator.codec.name} payload of {coordinator.numel} elements has {expected}"
            )
        total_s = self._transfer_s(expected)
        with self.watchdog.watch(context, "Average", self.settings.stream_idle_s, total_s) as watch:
            payload = receive_bytes(request_iterator, expected, "payload", watch)
        return coordinator.decode(payload)

    def _authorize(self, context: grpc.ServicerContext) -> int:
        metadata = dict(context.invocation_metadata() or ())
        rank_text = str(metadata.get(RANK_METADATA_KEY, ""))
        session = str(metadata.get(SESSION_METADATA_KEY, ""))
        if not rank_text.isdigit() or len(rank_text) > 9:
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, "join first: no rank and session")
        try:
            self.coordinator.authorize(int(rank_text), session)
        except NotAuthorized as error:
            log.warning("refused a call from %r: %s", context.peer(), error)
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, str(error))
        return int(rank_text)

    @contextmanager
    def _held(self, context: grpc.ServicerContext, method: str, rank: int) -> Iterator[None]:
        if not self.limits.try_acquire(method, rank):
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many {method} calls")
        try:
            yield
        finally:
            self.limits.release(method, rank)

    def _transfer_s(self, nbytes: int) -> float:
        """A generous bound for moving `nbytes` (past it, the stream is cut)."""
        return self.coordinator.rules.deadline_ceiling_s + 60.0 + nbytes / MIN_BYTES_PER_S


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.abort(code, details)
    raise AssertionError("abort raises")  # for the type checker


def _state_header(state: SharedState, sha: str, *, same: bool) -> pb.StateHeader:
    return pb.StateHeader(
        round=state.round,
        numel=state.anchor.numel(),
        params_sha256=sha,
        has_state=True,
        same=same,
        tensors=[spec_of(name, tensor) for name, tensor in state.tensors()],
    )


def _answer_chunks(answer: RoundAnswer) -> Iterator[pb.Chunk]:
    if answer.adopt is not None:
        state = answer.adopt
        header = _state_header(state, answer.params_sha256, same=False)
        size = sum(t.numel() * t.element_size() for _, t in state.tensors())
        yield pb.Chunk(
            reply=pb.AverageReply(
                round=state.round,
                participants=answer.participants,
                params_sha256=answer.params_sha256,
                payload_bytes=size,
                adopt=True,
                state=header,
            )
        )
        for _, tensor in state.tensors():
            yield from chunks_of(tensor.reshape(-1))
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

    def __init__(self, coordinator: Coordinator, settings: GrpcTransportConfig, token: str):
        self.coordinator = coordinator
        self.refused_calls = 0
        self.service = CoordinatorService(coordinator, settings)
        workers = 64 + 8 * coordinator.rules.islands
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            interceptors=[TokenInterceptor(token, self._on_refused)],
            options=CHANNEL_OPTIONS,
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_CoordinatorServicer_to_server(self.service, self._server)
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
        self.coordinator.stop()
        self._server.stop(grace_s).wait()
        self.service.watchdog.close()

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            self.coordinator.tick()

    def _on_refused(self, method: Any) -> None:
        self.refused_calls += 1
        log.warning("refused a call to %s: wrong or missing run token", method)
