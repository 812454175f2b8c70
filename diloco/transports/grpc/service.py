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
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from diloco.errors import listen_error
from diloco.transports.base import GroupMismatchError
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.aborts import abort, first_chunk, peer
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.coordinator import Coordinator, NotAuthorized
from diloco.transports.grpc.dataplane_host import dataplane_for
from diloco.transports.grpc.guard import CallLimits, StreamCut, StreamWatchdog
from diloco.transports.grpc.lanes import InvalidLane, LaneLimit, LaneRegistry, check_lane
from diloco.transports.grpc.payload_calls import PayloadCalls
from diloco.transports.grpc.rounds import RefusedPayload
from diloco.transports.grpc.security import (
    LANE_METADATA_KEY,
    RANK_METADATA_KEY,
    SESSION_METADATA_KEY,
    TokenInterceptor,
    server_credentials,
)
from diloco.transports.grpc.state_keeper import CHUNK_BYTES, StateChanged
from diloco.transports.grpc.wire import (
    check_specs,
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
        """The main lane's; each call is served by the coordinator of the lane it names."""
        self.lanes = LaneRegistry(coordinator, settings.max_lanes)
        self.settings = settings
        self.idle_s = settings.stream_idle_s
        self.header_wait_s = min(HEADER_WAIT_S, settings.stream_idle_s)
        self.watchdog = StreamWatchdog()
        self.payloads = PayloadCalls(self.watchdog, self.idle_s, self.header_wait_s)
        islands = coordinator.rules.islands
        self.limits = CallLimits(
            per_rank={"Average": 2, "Exchange": 2, "GetState": 2, "PutState": 1},
            total={
                "Average": 4 * islands + 4,
                "Exchange": 4 * islands + 4,
                "GetState": islands + 4,
                "PutState": 2,
            },
        )
        self.status_json: Callable[[], str] = lambda: "{}"
        self.refused_calls = 0
        """Calls refused for their session or for naming another rank (the token's refusals
        are the server's, the call limits' are `limits.refused`)."""
        self._count_lock = threading.Lock()

    # -- calls ------------------------------------------------------------------------------

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        lane = self._lane(context)

        def join(coordinator: Coordinator) -> tuple[Coordinator, tuple[int, bool, str]]:
            fingerprint = dict(request.fingerprint)
            joined = coordinator.join(
                request.rank, request.run_id, fingerprint, request.session, request.host
            )
            return coordinator, joined

        try:  # a lane opened by this Join is kept only if the Join succeeds
            coordinator, (round, has_state, session) = self.lanes.join(
                lane, join, dict(request.fingerprint)
            )
        except GroupMismatchError as error:
            if isinstance(error, LaneLimit):
                self._count_refusal()
            log.warning(
                "refused a join as island %d from %s: %s", request.rank, peer(context), error
            )
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))
        return pb.JoinReply(
            round=round,
            has_state=has_state,
            islands_active=coordinator.active_islands(),
            session=session,
        )

    def Average(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        rank, coordinator = self._authorize(context)
        with self._held(context, "Average", rank, coordinator.lane):
            answer = self.payloads.average(coordinator, rank, request_iterator, context)
            # Counted as it goes out: an island that has read its answer may end the call
            # before the stream's end, and then nothing after the last chunk runs.
            coordinator.status_feed.answer(rank, answer)
            yield from self.payloads.send_answer(coordinator, answer, context)

    def Exchange(
        self, request: pb.AverageHeader, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        rank, coordinator = self._authorize(context)
        with self._held(context, "Exchange", rank, coordinator.lane):
            yield from self.payloads.exchange(coordinator, rank, request, context)

    def GetState(
        self, request: pb.StateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        rank, coordinator = self._authorize(context)
        self._check_own(context, "GetState", rank, request.rank, request.run_id)
        with self._held(context, "GetState", rank, coordinator.lane):
            found = coordinator.download()
            if found is None:
                yield pb.Chunk(state=pb.StateHeader(has_state=False))
                return
            state, sha, data = found
            same = request.round == state.round and request.params_sha256 == sha
            yield pb.Chunk(state=state_header(state, sha, same=same))
            if same:
                return
            with self.payloads.moving(context, "GetState", state_nbytes(state)) as watch:
                try:
                    for piece in data:
                        yield pb.Chunk(data=piece)
                        watch.touch(len(piece))
                except StateChanged as error:
                    abort(context, grpc.StatusCode.UNAVAILABLE, str(error))

    def PutState(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> pb.PutStateReply:
        rank, coordinator = self._authorize(context)
        with self._held(context, "PutState", rank, coordinator.lane), self._seeding(coordinator):
            # One state is received at a time; the others wait here, unread, and are then told
            # the group has one (their islands fetch it).
            if coordinator.has_state():
                return pb.PutStateReply(accepted=False, round=coordinator.round)
            expected = coordinator.expected_numel()
            first = first_chunk(
                self.watchdog, context, request_iterator, "PutState", self.header_wait_s, "state"
            )
            header = first.state
            try:
                if header.run_id != coordinator.rules.run_id:
                    raise RefusedPayload(f"PutState for another run_id {header.run_id[:64]!r}")
                if header.rank != rank:
                    raise RefusedPayload(f"the header's rank {header.rank} is not the caller's")
                # Checked before a byte is allocated: the declared sizes must be the group's.
                if expected is not None and header.numel != expected:
                    raise RefusedPayload(
                        f"the state has {header.numel} parameters, the group's model {expected}"
                    )
                nbytes = state_bytes(check_specs(header))
                with self.payloads.moving(context, "PutState", nbytes) as watch:
                    state = receive_state(request_iterator, header, watch, grow=expected is None)
                accepted = coordinator.seed(rank, state, owned=True)
            except StreamCut as error:
                abort(context, grpc.StatusCode.CANCELLED, f"the stream was cut: {error}")
            except (RefusedPayload, ValueError) as error:
                coordinator.refuse(rank, str(error), what="state")
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"state refused: {error}")
            return pb.PutStateReply(accepted=accepted, round=coordinator.round)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        rank, coordinator = self._authorize(context)
        self._check_own(context, "Leave", rank, request.rank, request.run_id)
        coordinator.leave(rank)
        return pb.LeaveReply()

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        return pb.StatusReply(json=self.status_json())

    # -- helpers ----------------------------------------------------------------------------

    @contextmanager
    def _seeding(self, coordinator: Coordinator) -> Iterator[None]:
        """Hold `coordinator.seeding` while a state is received; a call that cannot take it
        within a stream's idle time goes on without it (and is refused if a state arrived)."""
        held = coordinator.seeding.acquire(timeout=self.idle_s)
        try:
            yield
        finally:
            if held:
                coordinator.seeding.release()

    def _authorize(self, context: grpc.ServicerContext) -> tuple[int, Coordinator]:
        """The caller's rank and its lane's coordinator, when its metadata holds the rank's
        session in that lane; else the call is aborted (UNAUTHENTICATED; INVALID_ARGUMENT for
        a malformed lane) before anything of it is read."""
        metadata = dict(context.invocation_metadata() or ())
        rank_text = str(metadata.get(RANK_METADATA_KEY, ""))
        session = str(metadata.get(SESSION_METADATA_KEY, ""))
        coordinator = self.lanes.get(self._lane(context))
        if not _RANK.fullmatch(rank_text) or coordinator is None:
            self._count_refusal()
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "join first: no rank and session")
        try:
            coordinator.authorize(int(rank_text), session)
        except NotAuthorized as error:
            self._count_refusal()
            log.warning("refused a call from %s: %s", peer(context), error)
            abort(context, grpc.StatusCode.UNAUTHENTICATED, str(error))
        return int(rank_text), coordinator

    def _lane(self, context: grpc.ServicerContext) -> str:
        """The lane the call names (metadata x-diloco-lane; "" for the main one)."""
        metadata = dict(context.invocation_metadata() or ())
        try:
            return check_lane(str(metadata.get(LANE_METADATA_KEY, "")))
        except InvalidLane as error:
            self.lanes.count_invalid()
            self._count_refusal()
            log.warning("refused a call from %s: %s", peer(context), error)
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))

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
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"island {rank} may call {method} for itself only, in its own run",
            )

    def _count_refusal(self) -> None:
        with self._count_lock:
            self.refused_calls += 1

    @contextmanager
    def _held(
        self, context: grpc.ServicerContext, method: str, rank: int, lane: str
    ) -> Iterator[None]:
        """Count the call against the limits of its method in its lane."""
        limited = f"{method}@{lane}" if lane else method
        if not self.limits.try_acquire(limited, rank):
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many {method} calls")
        try:
            yield
        finally:
            self.limits.release(limited, rank)


class CoordinatorServer:
    """A running coordinator: the grpc server and the thread that enforces deadlines."""

    def __init__(self, coordinator: Coordinator, settings: GrpcTransportConfig, token: str):
        self.coordinator = coordinator
        self.refused_calls = 0
        self.service = CoordinatorService(coordinator, settings)
        self.lanes = self.service.lanes
        self.dataplane = dataplane_for(settings, coordinator.rules, coordinator.codec, token)
        """The data plane payloads travel on, or None (grpc/dataplane_host.py)."""
        if self.dataplane is not None:
            host = self.service.payloads.dataplane = self.dataplane
            self.lanes.add_listener(
                lambda lane, lane_coordinator: lane_coordinator.attach_exchanges(host)
            )
        islands = coordinator.rules.islands
        # Each call waiting for its round holds a thread: 8 per island, 2 more in each lane.
        workers = 64 + 8 * islands + 2 * islands * settings.max_lanes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            interceptors=[TokenInterceptor(token, self._on_refused)],
            # grpc's default SO_REUSEPORT let a second coordinator on the same address start
            # and take half of the islands' connections: one listener per address.
            options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_CoordinatorServicer_to_server(self.service, self._server)
        key = "transport.grpc.listen" if settings.listen else "transport.grpc.address"
        address = settings.listen or settings.address
        credentials = server_credentials(settings)
        _check_resolves(key, address)
        try:
            if credentials is None:
                log.warning("the coordinator at %s runs WITHOUT TLS (grpc.insecure)", address)
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc says only "Failed to bind"
            port = 0
        if port == 0:
            raise OSError(
                f"{key}: the coordinator cannot listen on {address} (in use by another run or "
                "coordinator on this machine, or not one of its addresses)"
            )
        self.port = port
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="deadline", daemon=True)

    def start(self) -> CoordinatorServer:
        if self.dataplane is not None:
            self.dataplane.start()
        self._server.start()
        self._ticker.start()
        log.info("coordinator listening on port %d", self.port)
        return self

    def finished(self) -> bool:
        """Every lane that holds a state has closed its last round."""
        return self.lanes.finished()

    def stop(self, grace_s: float = 1.0) -> None:
        self._stop.set()
        self.lanes.stop()
        self._server.stop(grace_s).wait()
        if self.dataplane is not None:
            self.dataplane.stop()
        self.service.watchdog.close()

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            self.lanes.tick()

    def _on_refused(self, method: Any) -> None:
        self.refused_calls += 1
        log.warning("refused a call to %r: wrong or missing run token", str(method)[:100])


def _check_resolves(key: str, address: str) -> None:
    """A host that does not resolve, said with its key (grpc's own error names neither)."""
    host, _, port = address.rpartition(":")
    try:
        socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise listen_error(key, address, error) from None
