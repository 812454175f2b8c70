"""The coordinator's grpc service: the wire side of `Coordinator`, and a server to host it.

Streams carry a header message, then the bytes in chunks of CHUNK_BYTES, so no message comes
near grpc's size limits whatever the model size. Every call carries the run token (checked by
`security.TokenInterceptor`); every call but Join and Status also carries the caller's rank and
session in its metadata, checked before anything is read from the stream, and a request that
names a rank names the caller's own. Every stream is watched (`guard.StreamWatchdog`), and the
shared state is streamed from the keeper's one copy, chunk by chunk, to every reader.
Errors map to grpc status codes the island turns into clear messages: UNAUTHENTICATED (token,
session), FAILED_PRECONDITION (another model or run, a rank held by another island),
PERMISSION_DENIED (a request for another rank), INVALID_ARGUMENT (a refused payload),
UNAVAILABLE (not ready: retry), RESOURCE_EXHAUSTED (too many calls: retry), CANCELLED (a stream
cut as idle or too slow).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NoReturn

import grpc
import torch

from diloco.transports.base import GroupMismatchError
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.coordinator import Coordinator, NotAuthorized, RoundAnswer
from diloco.transports.grpc.guard import (
    MIN_BYTES_PER_S,
    CallLimits,
    StreamCut,
    StreamWatch,
    StreamWatchdog,
    check_average_header,
    check_metrics,
    transfer_s,
)
from diloco.transports.grpc.rounds import NotReady, RefusedPayload
from diloco.transports.grpc.security import (
    RANK_METADATA_KEY,
    SESSION_METADATA_KEY,
    TokenInterceptor,
    server_credentials,
)
from diloco.transports.grpc.state_keeper import CHUNK_BYTES, StateChanged
from diloco.transports.grpc.wire import (
    answer_parts,
    check_specs,
    receive_bytes,
    receive_state,
    state_bytes,
    state_header,
    state_nbytes,
)

log = logging.getLogger(__name__)

# Headroom over one chunk plus its framing.
MAX_MESSAGE_BYTES = 2 * CHUNK_BYTES
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
HEADER_WAIT_S = 10.0
"""How long a stream may take to send its first message (its header), at most."""
_RANK = re.compile(r"[0-9]{1,9}")


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, settings: GrpcTransportConfig):
        self.coordinator = coordinator
        self.settings = settings
        self.idle_s = settings.stream_idle_s
        self.header_wait_s = min(HEADER_WAIT_S, settings.stream_idle_s)
        self.watchdog = StreamWatchdog()
        islands = coordinator.rules.islands
        self.limits = CallLimits(
            per_rank={"Average": 2, "GetState": 2, "PutState": 1},
            total={"Average": 4 * islands + 4, "GetState": islands + 4, "PutState": 2},
        )
        self.status_json: Callable[[], str] = lambda: "{}"
        self.refused_calls = 0
        """Calls refused for their session or for naming another rank (the token's refusals
        are the server's, the call limits' are `limits.refused`)."""
        self._count_lock = threading.Lock()

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
            log.warning(
                "refused a join as island %d from %s: %s", request.rank, _peer(context), error
            )
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
            yield from self._send_answer(answer, context)

    def GetState(
        self, request: pb.StateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        rank = self._authorize(context)
        self._check_own(context, "GetState", rank, request.rank, request.run_id)
        with self._held(context, "GetState", rank):
            found = self.coordinator.download()
            if found is None:
                yield pb.Chunk(state=pb.StateHeader(has_state=False))
                return
            state, sha, data = found
            same = request.round == state.round and request.params_sha256 == sha
            yield pb.Chunk(state=state_header(state, sha, same=same))
            if same:
                return
            with self._moving(context, "GetState", state_nbytes(state)) as watch:
                try:
                    for piece in data:
                        yield pb.Chunk(data=piece)
                        watch.touch(len(piece))
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
            with self.watchdog.watch(
                context, "PutState", self.header_wait_s, self.header_wait_s
            ) as watch:
                first = next(request_iterator, None)
            _end_if_cut(context, watch)
            if first is None or first.WhichOneof("kind") != "state":
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "PutState starts with a header")
            header = first.state
            try:
                if header.run_id != self.coordinator.rules.run_id:
                    raise RefusedPayload(f"PutState for another run_id {header.run_id[:64]!r}")
                if header.rank != rank:
                    raise RefusedPayload(f"the header's rank {header.rank} is not the caller's")
                # Checked before a byte is allocated: the declared sizes must be the group's.
                if expected is not None and header.numel != expected:
                    raise RefusedPayload(
                        f"the state has {header.numel} parameters, the group's model {expected}"
                    )
                nbytes = state_bytes(check_specs(header))
                with self._moving(context, "PutState", nbytes) as watch:
                    state = receive_state(request_iterator, header, watch, grow=expected is None)
                accepted = self.coordinator.seed(rank, state)
            except StreamCut as error:
                _abort(context, grpc.StatusCode.CANCELLED, f"the stream was cut: {error}")
            except (RefusedPayload, ValueError) as error:
                self.coordinator.refuse(rank, str(error), what="state")
                _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"state refused: {error}")
            return pb.PutStateReply(accepted=accepted, round=self.coordinator.round)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        rank = self._authorize(context)
        self._check_own(context, "Leave", rank, request.rank, request.run_id)
        self.coordinator.leave(rank)
        return pb.LeaveReply()

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return pb.StatusReply(json=self.status_json())

    # -- helpers ----------------------------------------------------------------------------

    def _average(
        self, rank: int, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> RoundAnswer:
        coordinator = self.coordinator
        with self.watchdog.watch(
            context, "Average", self.header_wait_s, self.header_wait_s
        ) as watch:
            first = next(request_iterator, None)
        _end_if_cut(context, watch)
        if first is None or first.WhichOneof("kind") != "average":
            _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "an Average call starts with a header"
            )
        header = first.average
        try:
            if header.run_id != coordinator.rules.run_id:
                raise RefusedPayload(f"run_id {header.run_id[:64]!r} is not this coordinator's")
            if header.rank != rank:
                raise RefusedPayload(f"the header's rank {header.rank} is not the caller's {rank}")
            check_average_header(header, coordinator.rules, coordinator.round)
            delta, received = self._receive_payload(header, request_iterator, context)
            answer = coordinator.submit(
                rank,
                header.round,
                header.weight,
                header.params_sha256,
                delta,
                wait_s=2 * coordinator.rules.deadline_ceiling_s,
            )
        except StreamCut as error:
            _abort(context, grpc.StatusCode.CANCELLED, f"the stream was cut: {error}")
        except NotReady as error:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
        except TimeoutError as error:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
        except (RefusedPayload, ValueError) as error:
            coordinator.refuse(rank, str(error))
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"payload refused: {error}")
        coordinator.note_metrics(rank, check_metrics(header.metrics), received)
        return answer

    def _receive_payload(
        self, header: pb.AverageHeader, request_iterator: Iterator[pb.Chunk], context: Any
    ) -> tuple[torch.Tensor | None, int]:
        """(the decoded payload of the open round, its bytes); None, 0 for another round (its
        payload is never read)."""
        coordinator = self.coordinator
        if header.round != coordinator.round:
            return None, 0
        expected = coordinator.codec.payload_bytes(coordinator.numel) if coordinator.numel else 0
        if header.payload_bytes != expected:
            raise RefusedPayload(
                f"the payload announces {header.payload_bytes} bytes; a "
                f"{coordinator.codec.name} payload of {coordinator.numel} elements has {expected}"
            )
        with self._moving(context, "Average", expected) as watch:
            payload = receive_bytes(request_iterator, expected, "payload", watch)
        return coordinator.decode(payload), expected

    def _send_answer(
        self, answer: RoundAnswer, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        """The answer's header, then its bytes: the mean, or the state to adopt, read from the
        keeper's one copy chunk by chunk (UNAVAILABLE if a round's step changes it meanwhile:
        the island sends again)."""
        head, data, nbytes = answer_parts(answer, self.coordinator.keeper.read_chunks)
        with self._moving(context, "answer", nbytes) as watch:
            yield head
            try:
                for chunk in data:
                    yield chunk
                    watch.touch(len(chunk.data))
            except StateChanged as error:
                _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))

    def _authorize(self, context: grpc.ServicerContext) -> int:
        """The caller's rank, when its metadata holds the rank's session; else the call is
        aborted (UNAUTHENTICATED) before anything of it is read."""
        metadata = dict(context.invocation_metadata() or ())
        rank_text = str(metadata.get(RANK_METADATA_KEY, ""))
        session = str(metadata.get(SESSION_METADATA_KEY, ""))
        if not _RANK.fullmatch(rank_text):
            self._count_refusal()
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, "join first: no rank and session")
        try:
            self.coordinator.authorize(int(rank_text), session)
        except NotAuthorized as error:
            self._count_refusal()
            log.warning("refused a call from %s: %s", _peer(context), error)
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, str(error))
        return int(rank_text)

    def _check_own(
        self, context: grpc.ServicerContext, method: str, rank: int, asked: int, run_id: str
    ) -> None:
        """A request that names a rank and run must name the caller's own."""
        if asked != rank or run_id != self.coordinator.rules.run_id:
            self._count_refusal()
            log.warning(
                "refused a %s from island %d for island %d of run %r",
                method,
                rank,
                asked,
                run_id[:64],
            )
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"island {rank} may call {method} for itself only, in its own run",
            )

    def _count_refusal(self) -> None:
        with self._count_lock:
            self.refused_calls += 1

    def _moving(
        self, context: grpc.ServicerContext, what: str, nbytes: int
    ) -> AbstractContextManager[StreamWatch]:
        """The watch of a stream that moves `nbytes`: cut when idle, slower than the slowest
        link given time for, or past the time its bytes take at that rate."""
        total_s = transfer_s(nbytes, self.idle_s)
        return self.watchdog.watch(context, what, self.idle_s, total_s, MIN_BYTES_PER_S)

    @contextmanager
    def _held(self, context: grpc.ServicerContext, method: str, rank: int) -> Iterator[None]:
        if not self.limits.try_acquire(method, rank):
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many {method} calls")
        try:
            yield
        finally:
            self.limits.release(method, rank)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.abort(code, details)
    raise AssertionError("abort raises")  # for the type checker


def _end_if_cut(context: grpc.ServicerContext, watch: StreamWatch) -> None:
    """End a call whose stream the watchdog cut (its read ended early) as CANCELLED."""
    if watch.cut:
        _abort(context, grpc.StatusCode.CANCELLED, "the stream was cut: idle or too slow")


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return repr(context.peer())
    except Exception:
        return "?"


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
        log.warning("refused a call to %r: wrong or missing run token", str(method)[:100])
