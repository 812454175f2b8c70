"""The island's side of the grpc transport: join, average, fetch state, leave.

Every call carries the run token, and every call after Join this island's session: a secret
the island makes once and keeps in `session_file` before its first join, so a join retried
after its answer was lost, or a restarted island, presents it and keeps its rank, while no
other caller can take it. Every call has a deadline. A coordinator that cannot be reached
(down, restarting, busy) is retried with bounded exponential backoff for `grpc.retry_s`; the
same payload is sent again, which the coordinator takes as the same island's payload for the
same round.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from diloco.checkpoint.atomic import write_atomic
from diloco.codecs.base import Codec
from diloco.errors import ConfigError
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.base import AverageResult, GroupMismatchError
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.guard import MIN_BYTES_PER_S
from diloco.transports.grpc.security import (
    TLS_TARGET_NAME,
    call_metadata,
    channel_credentials,
    token_metadata,
)
from diloco.transports.grpc.service import CHANNEL_OPTIONS
from diloco.transports.grpc.wire import (
    chunks_of,
    receive_bytes,
    receive_state,
    spec_of,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Worth retrying: the coordinator is down, restarting, busy or not ready for this call yet,
# or it cut a stream that moved no bytes for transport.grpc.stream_idle_s (CANCELLED: this
# island was too slow for a moment; the same call gets the same answer).
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


class PayloadRefusedError(RuntimeError):
    """The coordinator refused this island's payload (malformed or non-finite)."""


class GrpcTransport:
    """One island's handle on a grpc coordinator.

    Args:
        session_file: where this island keeps the session the coordinator gave it (its
            run.dir); None keeps it in memory only.
    """

    def __init__(
        self,
        settings: GrpcTransportConfig,
        *,
        run_id: str,
        token: str,
        codec: Codec,
        numel: int,
        rank: int,
        num_islands: int,
        session_file: Path | None = None,
    ):
        self.settings = settings
        self.run_id = run_id
        self.codec = codec
        self.numel = numel
        self.rank = rank
        self.num_islands = num_islands
        self._token = token
        self._token_metadata = token_metadata(token)
        self._session_file = session_file
        self._session = _read_session(session_file) or secrets.token_hex(16)
        self._metrics: dict[str, float] = {}
        self._fingerprint: dict[str, str] = {}
        credentials = channel_credentials(settings)
        options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
        if credentials is None:
            self._channel = grpc.insecure_channel(settings.address, options=options)
        else:
            options.append(("grpc.ssl_target_name_override", TLS_TARGET_NAME))
            self._channel = grpc.secure_channel(settings.address, credentials, options=options)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._closed = False
        self.on_close: Callable[[], None] | None = None
        """Called last by `close` (an island that hosts the coordinator stops it there)."""

    # -- Transport --------------------------------------------------------------------------

    def join(self, available_rounds: Sequence[int], fingerprint: Mapping[str, str]) -> int | None:
        """Register with the coordinator; resume from this island's own newest checkpoint.

        The shared state then comes from the coordinator (`shared_state`), whatever round
        the checkpoint holds.
        """
        self._fingerprint = dict(fingerprint)
        self._join()
        return max(available_rounds) if available_rounds else None

    def shared_state(self, local: SharedState) -> SharedState | None:
        local_sha = params_sha256(local.anchor)
        while True:
            header, state = self._retrying(
                "fetching the shared state", lambda: self._get_state(local.round, local_sha)
            )
            if header.has_state:
                return None if header.same else state
            seeded = self._retrying("seeding the shared state", lambda: self._put_state(local))
            if seeded:
                log.info("this island seeded the group's shared state at round %d", local.round)
                return None

    def note_metrics(self, metrics: Mapping[str, float]) -> None:
        """Figures of this island's latest round, sent with its next payload (status page)."""
        self._metrics = {key: float(value) for key, value in metrics.items()}

    def average(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None = None,
    ) -> AverageResult:
        home = payload.device
        host_payload = payload.cpu()
        header = pb.AverageHeader(
            run_id=self.run_id,
            rank=self.rank,
            round=round,
            weight=weight,
            params_sha256=params_sha256 or "",
            payload_bytes=host_payload.numel(),
            metrics=self._metrics,
        )
        # The round may wait for the slowest island up to its deadline, then both ways move
        # the payload: past this, the call is given up and retried.
        timeout_s = self._transfer_s(2 * host_payload.numel()) + self.settings.deadline_ceiling_s

        def call() -> AverageResult:
            def requests() -> Iterator[pb.Chunk]:
                yield pb.Chunk(average=header)
                yield from chunks_of(host_payload)

            replies = self._stub.Average(requests(), metadata=self._metadata(), timeout=timeout_s)
            return self._read_answer(replies, home, host_payload.numel())

        return self._retrying(f"averaging round {round}", call)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A coordinator that is gone has nothing to be left.
        with contextlib.suppress(grpc.RpcError):
            self._stub.Leave(
                pb.LeaveRequest(run_id=self.run_id, rank=self.rank),
                metadata=self._metadata(),
                timeout=2.0,
            )
        self._channel.close()
        if self.on_close is not None:
            self.on_close()

    # -- calls ------------------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self._token, self.rank, self._session)

    def _join(self) -> None:
        reply = self._retrying("joining", self._join_once)
        log.info(
            "joined the coordinator at %s: round %d, %d island(s) active",
            self.settings.address,
            reply.round,
            reply.islands_active,
        )

    def _join_once(self) -> pb.JoinReply:
        self._save_session()  # before the join: a lost answer must not lose the session
        request = pb.JoinRequest(
            run_id=self.run_id,
            rank=self.rank,
            fingerprint=self._fingerprint,
            session=self._session,
            host=socket.gethostname(),
        )
        reply: pb.JoinReply = self._stub.Join(request, metadata=self._token_metadata, timeout=30.0)
        if reply.session != self._session:  # the coordinator made one instead
            self._session = reply.session
            self._save_session()
        return reply

    def _save_session(self) -> None:
        path = self._session_file
        if path is None or _read_session(path) == self._session:
            return
        write_atomic(path, self._session)
        path.chmod(0o600)

    def _get_state(self, round: int, sha: str) -> tuple[pb.StateHeader, SharedState | None]:
        request = pb.StateRequest(
            run_id=self.run_id, rank=self.rank, round=round, params_sha256=sha
        )
        timeout_s = self._transfer_s(16 * self.numel)
        chunks = iter(self._stub.GetState(request, metadata=self._metadata(), timeout=timeout_s))
        header = next(chunks).state
        if not header.has_state or header.same:
            return header, None
        if header.numel != self.numel:
            raise GroupMismatchError(
                f"the coordinator's shared state has {header.numel} parameters, this model "
                f"{self.numel}"
            )
        return header, receive_state(chunks, header)

    def _put_state(self, local: SharedState) -> bool:
        tensors = [(name, t.detach().cpu()) for name, t in local.tensors()]
        header = pb.StateHeader(
            round=local.round,
            numel=local.anchor.numel(),
            params_sha256=params_sha256(local.anchor),
            has_state=True,
            run_id=self.run_id,
            rank=self.rank,
            tensors=[spec_of(name, tensor) for name, tensor in tensors],
        )

        def requests() -> Iterator[pb.Chunk]:
            yield pb.Chunk(state=header)
            for _, tensor in tensors:
                yield from chunks_of(tensor)

        timeout_s = self._transfer_s(16 * self.numel)
        reply = self._stub.PutState(requests(), metadata=self._metadata(), timeout=timeout_s)
        return bool(reply.accepted)

    def _read_answer(
        self, replies: Iterator[pb.Chunk], home: torch.device, sent: int
    ) -> AverageResult:
        replies = iter(replies)
        reply = next(replies).reply
        if reply.adopt:
            if reply.state.numel != self.numel:
                raise GroupMismatchError(
                    f"the coordinator's shared state has {reply.state.numel} parameters, this "
                    f"model {self.numel}"
                )
            state = receive_state(replies, reply.state)
            state = SharedState(
                state.round,
                state.anchor.to(home),
                {name: t.to(home) for name, t in state.outer_state.items()},
            )
            empty = torch.zeros(0, device=home)
            return AverageResult(empty, reply.participants, sent, reply.payload_bytes, adopt=state)
        expected = self.codec.payload_bytes(self.numel)
        if reply.payload_bytes != expected:
            raise RuntimeError(
                f"the coordinator answered {reply.payload_bytes} bytes; a mean has {expected}"
            )
        mean_payload = receive_bytes(replies, reply.payload_bytes, "mean")
        if reply.late:
            log.warning(
                "round %d closed before this island's payload arrived: applying the group's mean",
                reply.round,
            )
        mean = self.codec.decode(mean_payload, self.numel).to(home)
        return AverageResult(mean, reply.participants, sent, reply.payload_bytes)

    def _transfer_s(self, nbytes: int) -> float:
        return 60.0 + nbytes / MIN_BYTES_PER_S

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """`call`, retried with backoff while the coordinator is unreachable or not ready."""
        deadline = time.monotonic() + self.settings.retry_s
        delay = 0.2
        closed_on_connect = 0
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                code = error.code() if hasattr(error, "code") else None
                details = (error.details() if hasattr(error, "details") else str(error)) or ""
                if code == grpc.StatusCode.UNAUTHENTICATED and "join first" in details:
                    self._join_quietly()  # the coordinator forgot this island (restarted)
                    code = grpc.StatusCode.UNAVAILABLE
                self._raise_permanent(code, details, what)
                # A TLS server closes a plaintext connection at once; a coordinator that is
                # down refuses it instead.
                closed_on_connect = closed_on_connect + 1 if "Socket closed" in details else 0
                if self.settings.insecure and closed_on_connect >= 3:
                    raise ConfigError(
                        f"the coordinator at {self.settings.address} closes plaintext "
                        "connections: it requires TLS; set transport.grpc.tls_cert and tls_key "
                        "(and drop transport.grpc.insecure)"
                    ) from None
                if time.monotonic() + delay > deadline:
                    raise ConnectionError(
                        f"the coordinator at {self.settings.address} did not answer for "
                        f"{self.settings.retry_s:.0f} s while {what} (last error: {details}); "
                        "is it running, and are transport.grpc.address and TLS right?"
                    ) from None
                if "has not joined" in details:
                    self._join_quietly()
                log.warning("%s: %s; retrying in %.1f s", what, details, delay)
                time.sleep(delay * (1 + 0.2 * random.random()))
                delay = min(delay * 2, 5.0)

    def _join_quietly(self) -> None:
        # Failing here is fine: the retry loop reports what is wrong.
        with contextlib.suppress(grpc.RpcError):
            self._join_once()

    def _raise_permanent(self, code: grpc.StatusCode | None, details: str, what: str) -> None:
        address = self.settings.address
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise ConfigError(
                f"the coordinator at {address} refused the run token while {what}: every site "
                f"needs the same ${self.settings.token_env} (or transport.grpc.token_file)"
            )
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            raise GroupMismatchError(f"the coordinator at {address} refused: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise PayloadRefusedError(f"the coordinator at {address} refused: {details}")
        if code == grpc.StatusCode.UNAVAILABLE and _tls_mismatch(details):
            raise ConfigError(
                f"cannot reach the coordinator at {address} over TLS ({details}): check "
                "transport.grpc.tls_cert / tls_ca, and that both sides use TLS"
            )
        if code is not None and code not in _TRANSIENT:
            raise RuntimeError(f"the coordinator at {address} failed while {what}: {details}")


def _tls_mismatch(details: str) -> bool:
    text = (details or "").lower()
    return any(word in text for word in ("ssl", "tls", "handshake", "certificate", "wrong version"))


def _read_session(path: Path | None) -> str:
    """The session saved by this island's previous process, if any."""
    if path is None or not path.is_file():
        return ""
    text = path.read_text().strip()
    return text if re.fullmatch(r"[0-9a-f]{32,64}", text) else ""
