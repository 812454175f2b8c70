"""The island's side of the grpc transport: join, average, fetch state, leave.

Every call carries the run token. A coordinator that cannot be reached (down, restarting) is
retried with bounded exponential backoff for `grpc.retry_s`; the same payload is sent again,
which the coordinator takes as the same island's payload for the same round.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import grpc
import torch

from diloco.codecs import Codec
from diloco.config.schema import GrpcTransportConfig
from diloco.errors import ConfigError
from diloco.outer.sync import params_sha256
from diloco.transports.base import AverageResult, GroupMismatchError, SharedState
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.security import (
    TLS_TARGET_NAME,
    channel_credentials,
    token_metadata,
)
from diloco.transports.grpc.service import CHANNEL_OPTIONS, chunks_of, receive_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

# Worth retrying: the coordinator is down, restarting, or not ready for this call yet.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


class PayloadRefusedError(RuntimeError):
    """The coordinator refused this island's payload (malformed or non-finite)."""


class GrpcTransport:
    """One island's handle on a grpc coordinator."""

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
    ):
        self.settings = settings
        self.run_id = run_id
        self.codec = codec
        self.numel = numel
        self.rank = rank
        self.num_islands = num_islands
        self._metadata = token_metadata(token)
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
        local_sha = _sha(local.anchor)
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

    def average(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None = None,
    ) -> AverageResult:
        home = payload.device
        host_payload = payload.cpu()

        def call() -> AverageResult:
            header = pb.AverageHeader(
                run_id=self.run_id,
                rank=self.rank,
                round=round,
                weight=weight,
                params_sha256=params_sha256 or "",
                payload_bytes=host_payload.numel(),
            )

            def requests() -> Iterator[pb.Chunk]:
                yield pb.Chunk(average=header)
                yield from chunks_of(host_payload)

            return self._read_answer(
                self._stub.Average(requests(), metadata=self._metadata), home, host_payload.numel()
            )

        return self._retrying(f"averaging round {round}", call)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A coordinator that is gone has nothing to be left.
        with contextlib.suppress(grpc.RpcError):
            self._stub.Leave(
                pb.LeaveRequest(run_id=self.run_id, rank=self.rank),
                metadata=self._metadata,
                timeout=2.0,
            )
        self._channel.close()
        if self.on_close is not None:
            self.on_close()

    # -- calls ------------------------------------------------------------------------------

    def _join(self) -> None:
        request = pb.JoinRequest(run_id=self.run_id, rank=self.rank, fingerprint=self._fingerprint)
        reply = self._retrying(
            "joining", lambda: self._stub.Join(request, metadata=self._metadata, timeout=30.0)
        )
        log.info(
            "joined the coordinator at %s: round %d, %d island(s) active",
            self.settings.address,
            reply.round,
            reply.islands_active,
        )

    def _get_state(self, round: int, sha: str) -> tuple[pb.StateHeader, SharedState | None]:
        request = pb.StateRequest(
            run_id=self.run_id, rank=self.rank, round=round, params_sha256=sha
        )
        chunks = iter(self._stub.GetState(request, metadata=self._metadata))
        first = next(chunks)
        header = first.state
        if not header.has_state or header.same:
            return header, None
        if header.numel != self.numel:
            raise GroupMismatchError(
                f"the coordinator's shared state has {header.numel} parameters, this model "
                f"{self.numel}"
            )
        anchor = receive_bytes(chunks, 4 * self.numel, "anchor").view(torch.float32)
        momentum = receive_bytes(chunks, 4 * self.numel, "momentum").view(torch.float32)
        return header, SharedState(int(header.round), anchor, momentum)

    def _put_state(self, local: SharedState) -> bool:
        header = pb.StateHeader(
            round=local.round,
            numel=local.anchor.numel(),
            params_sha256=_sha(local.anchor),
            has_state=True,
            run_id=self.run_id,
            rank=self.rank,
        )

        def requests() -> Iterator[pb.Chunk]:
            yield pb.Chunk(state=header)
            yield from chunks_of(local.anchor.detach().to(torch.float32).cpu())
            yield from chunks_of(local.momentum.detach().to(torch.float32).cpu())

        reply = self._stub.PutState(requests(), metadata=self._metadata)
        return bool(reply.accepted)

    def _read_answer(
        self, replies: Iterator[pb.Chunk], home: torch.device, sent: int
    ) -> AverageResult:
        replies = iter(replies)
        first = next(replies)
        reply = first.reply
        if reply.adopt:
            anchor = receive_bytes(replies, 4 * self.numel, "anchor").view(torch.float32)
            momentum = receive_bytes(replies, 4 * self.numel, "momentum").view(torch.float32)
            state = SharedState(int(reply.round), anchor.to(home), momentum.to(home))
            empty = torch.zeros(0, device=home)
            return AverageResult(empty, reply.participants, sent, 8 * self.numel, adopt=state)
        mean_payload = receive_bytes(replies, reply.payload_bytes, "mean")
        if reply.late:
            log.warning(
                "round %d closed before this island's payload arrived: applying the group's mean",
                reply.round,
            )
        mean = self.codec.decode(mean_payload, self.numel).to(home)
        return AverageResult(mean, reply.participants, sent, reply.payload_bytes)

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
                details = error.details() if hasattr(error, "details") else str(error)
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
                if "join first" in (details or "") or "has not joined" in (details or ""):
                    self._join_quietly()
                log.warning("%s: %s; retrying in %.1f s", what, details, delay)
                time.sleep(delay * (1 + 0.2 * random.random()))
                delay = min(delay * 2, 5.0)

    def _join_quietly(self) -> None:
        # Failing here is fine: the retry loop reports what is wrong.
        with contextlib.suppress(grpc.RpcError):
            self._stub.Join(
                pb.JoinRequest(run_id=self.run_id, rank=self.rank, fingerprint=self._fingerprint),
                metadata=self._metadata,
                timeout=10.0,
            )

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


def _sha(anchor: torch.Tensor) -> str:
    return params_sha256(anchor)
