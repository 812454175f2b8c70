"""The island's side of the grpc transport: join, average, fetch state, leave.

Every call carries the run token, and every call after Join this island's session: a secret
the island makes once and keeps in `session_file` before its first join, so a join retried
after its answer was lost, or a restarted island, presents it and keeps its rank, while no
other caller can take it. Every call has a deadline. A coordinator that cannot be reached
(down, restarting, busy) is retried with bounded exponential backoff for `grpc.retry_s`; the
same payload is sent again, which the coordinator takes as the same island's payload for the
same round (grpc/retrying.py). With the data plane (transport.grpc.dataplane, the default) a
payload's header goes on grpc and its bytes on the data plane, with the ticket that comes back
(grpc/island_dataplane.py); a coordinator without one gets the bytes on grpc (Average).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from diloco.checkpoint.atomic import write_atomic
from diloco.codecs.base import Codec
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.base import AverageResult, GroupMismatchError
from diloco.transports.dataplane.codec_chunks import decode_into, decodes_finite
from diloco.transports.dataplane.framing import AnswerBroken, DataPlaneError
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc import coordinator_pb2_grpc as pb_grpc
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.guard import MIN_BYTES_PER_S
from diloco.transports.grpc.island_dataplane import IslandDataPlane
from diloco.transports.grpc.lanes import check_lane, lane_fingerprint
from diloco.transports.grpc.retrying import PayloadRefusedError as PayloadRefusedError
from diloco.transports.grpc.retrying import retrying
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

_SPENT_WAIT_S = 1.0
"""Between asks while the coordinator still holds a ticket for a spent payload."""

T = TypeVar("T")


class _NoDataPlane(Exception):
    """The coordinator answers Exchange with UNIMPLEMENTED."""


class GrpcTransport:
    """One island's handle on a grpc coordinator.

    Args:
        session_file: where this island keeps the session the coordinator gave it (its
            run.dir); None keeps it in memory only.
        lane: the exchange group this transport carries ("": the main one; a fragment's or a
            rank's otherwise, grpc/lanes.py); it joins with `parameters` = `numel`.
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
        lane: str = "",
    ):
        self.settings = settings
        self.lane = check_lane(lane)
        self.run_id = run_id
        self.codec = codec
        self.numel = numel
        self.rank = rank
        self.num_islands = num_islands
        self._token = token
        self._token_metadata = token_metadata(token, self.lane)
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
        self._dataplane = IslandDataPlane(settings) if settings.dataplane.enabled else None
        self.visible_maddrs: tuple[str, ...] = ()
        """The coordinator this transport hosts, if any: the island's other lanes reach it
        there (`TransportSetup.bootstrap`) instead of starting one each."""

    # -- Transport --------------------------------------------------------------------------

    def join(self, available_rounds: Sequence[int], fingerprint: Mapping[str, str]) -> int | None:
        """Register with the coordinator; resume from this island's own newest checkpoint.

        The shared state then comes from the coordinator (`shared_state`), whatever round
        the checkpoint holds.
        """
        self._fingerprint = (
            lane_fingerprint(fingerprint, self.numel) if self.lane else dict(fingerprint)
        )
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
        return self._average(payload, weight, round, params_sha256, _MeanHome(payload.device))

    def average_into(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None,
        spare_N: torch.Tensor | None,
        *,
        checked_finite: bool = False,
    ) -> AverageResult:
        home = _MeanHome(payload.device, spare_N)
        return self._average(payload, weight, round, params_sha256, home, checked_finite)

    def _average(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None,
        home: _MeanHome,
        checked_finite: bool = False,
    ) -> AverageResult:
        host_payload = payload.cpu().contiguous()
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
            return self._read_answer(next(replies).reply, replies, home, host_payload.numel())

        # A payload that is not finite values of this codec (a bug: OuterSync checks its
        # pseudo-gradient and codecs refuse to encode NaN) goes on grpc, where the coordinator
        # refuses it at once, naming this island; on the data plane it would be refused only
        # once its round's participants are fixed. The check runs while the header is on its
        # way (_FiniteCheck); a bad payload cancels that call. A payload its caller has
        # checked (OuterSync's own pass over the pseudo-gradient) is not read again: the
        # second pass cost 10-16 % of a codec-none round on the 2-core box.
        if self._dataplane is not None:
            finite = (
                _Checked() if checked_finite else _FiniteCheck(self.codec, host_payload, self.numel)
            )
            try:
                result = self._average_on_dataplane(header, host_payload, home, timeout_s, finite)
            except _NotFinite:
                result = None
            if result is not None:
                return result
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
        return call_metadata(self._token, self.rank, self._session, self.lane)

    def _join(self) -> None:
        reply = self._retrying("joining", self._join_once)
        log.info(
            "joined the coordinator at %s%s: round %d, %d island(s) active",
            self.settings.address,
            f" in lane {self.lane}" if self.lane else "",
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
        self, reply: pb.AverageReply, replies: Iterator[pb.Chunk], home: _MeanHome, sent: int
    ) -> AverageResult:
        """The answer `reply` heads, its bytes read from `replies`: a mean, or a state."""
        if reply.adopt:
            if reply.state.numel != self.numel:
                raise GroupMismatchError(
                    f"the coordinator's shared state has {reply.state.numel} parameters, this "
                    f"model {self.numel}"
                )
            state = receive_state(replies, reply.state)
            state = SharedState(
                state.round,
                state.anchor.to(home.device),
                {name: t.to(home.device) for name, t in state.outer_state.items()},
            )
            empty = torch.zeros(0, device=home.device)
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
        mean = home.decode(self.codec, mean_payload, self.numel)
        return AverageResult(mean, reply.participants, sent, reply.payload_bytes)

    def _average_on_dataplane(
        self,
        header: pb.AverageHeader,
        payload: torch.Tensor,
        home: _MeanHome,
        timeout_s: float,
        finite: _FiniteCheck | _Checked,
    ) -> AverageResult | None:
        """The header on grpc (Exchange), the payload on the data plane with the ticket that
        comes back; a failed exchange asks again (for `retry_s` at most). None: the coordinator
        has no data plane (the payload then goes with Average, from now on).

        Raises:
            _NotFinite: `finite` found that the payload does not decode to finite values
                before its exchange began (it goes on grpc, to be refused there).
            PayloadRefusedError: ... while its exchange was under way (that exchange fails).
        """
        assert self._dataplane is not None
        what, sent = f"averaging round {header.round}", payload.numel()
        expected = self.codec.payload_bytes(self.numel)
        deadline = time.monotonic() + self.settings.retry_s
        spent = False  # the payload's buffer holds part of a broken answer
        while True:
            try:
                reply, replies = self._retrying(what, lambda: self._ask(header, timeout_s, finite))
            except _NoDataPlane:
                if spent:  # nothing left to send on grpc either
                    raise ConnectionError(
                        f"the coordinator at {self.settings.address} lost its data plane while "
                        f"{what}, after this island's payload was spent"
                    ) from None
                log.warning("the coordinator has no data plane: payloads go on grpc")
                self._dataplane = None
                return None
            if not reply.ticket:  # the round's mean (late or retried), or a state to adopt
                return self._read_answer(reply, replies, home, sent)
            if spent:
                # Only a coordinator restarted from an older state asks for a payload again
                # after its answer began: the round goes on without this island (dropped at
                # the ticket's connect deadline), which then gets the round's mean.
                self._give_up_by(deadline, what, "the payload is spent")
                time.sleep(_SPENT_WAIT_S)
                continue
            finite.raise_if_bad()
            try:
                # The check ends before the payload's trailer (the answer, read into the
                # payload's buffer, comes after it): a bad payload is not taken here.
                # Decoded before the connection closes: the coordinator hears then that this
                # island is done with the answer (and only then takes its outer step).
                mean = self._dataplane.exchange(
                    reply, payload, expected, timeout_s, before_trailer=finite.require,
                    use_answer=lambda answer: home.decode(self.codec, answer, self.numel),
                )  # fmt: skip
            except _NotFinite:
                # Its exchange failed (the coordinator drops this island from it, and the
                # round goes on): too late to be refused on grpc, the round may be closed.
                raise PayloadRefusedError(
                    f"{what}: this island's payload does not decode to finite values (NaN or "
                    "inf); the data plane dropped it before its end, so it was not averaged"
                ) from None
            except DataPlaneError as error:
                self._give_up_by(deadline, what, str(error))
                log.warning("%s on the data plane: %s; asking the coordinator again", what, error)
                if isinstance(error, AnswerBroken):
                    spent = True  # from now on this island can only wait for the mean
                    log.warning("%s: the payload's buffer holds part of the answer", what)
                continue
            return AverageResult(mean, reply.participants, sent, expected)

    def _give_up_by(self, deadline: float, what: str, last_error: str) -> None:
        if time.monotonic() > deadline:
            raise ConnectionError(
                f"the data plane of the coordinator at {self.settings.address} failed for "
                f"{self.settings.retry_s:.0f} s while {what} (last error: {last_error})"
            )

    def _ask(
        self, header: pb.AverageHeader, timeout_s: float, finite: _FiniteCheck | _Checked
    ) -> tuple[pb.AverageReply, Iterator[pb.Chunk]]:
        replies = self._stub.Exchange(header, metadata=self._metadata(), timeout=timeout_s)
        finite.when_bad(replies.cancel)
        try:
            first = next(replies)
        except grpc.RpcError as error:
            finite.raise_if_bad()  # it cancelled the call
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise _NoDataPlane() from None
            raise
        return first.reply, replies

    def _transfer_s(self, nbytes: int) -> float:
        return 60.0 + nbytes / MIN_BYTES_PER_S

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """`call`, retried with backoff while the coordinator is unreachable or not ready."""
        return retrying(self.settings, what, call, rejoin=self._join_quietly)

    def _join_quietly(self) -> None:
        # Failing here is fine: the retry loop reports what is wrong.
        with contextlib.suppress(grpc.RpcError):
            self._join_once()


class _NotFinite(Exception):
    """The payload does not decode to finite values: it goes on grpc, to be refused there."""


class _Checked:
    """A payload the caller has already found to decode to finite values: nothing to check."""

    def when_bad(self, cancel: Callable[[], object]) -> None:
        """Never bad."""

    def raise_if_bad(self) -> None:
        """Never bad."""

    def require(self) -> None:
        """Never bad."""


class _FiniteCheck:
    """`decodes_finite(codec, payload, numel)` in a thread of its own, while the round's
    header waits for the round's participants and the payload goes out: a pass over the
    payload (11-15 ms of a 0.2 s round for 100 MB, 58-70 ms of 1.1 s for 496 MB, on the
    2-core box) off the round's path. A bad payload cancels the call it is told of (the
    header's wait), or fails the exchange before the payload's trailer (`require`)."""

    def __init__(self, codec: Codec, payload: torch.Tensor, numel: int):
        self._finite: bool | None = None
        self._on_bad: Callable[[], object] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, args=(codec, payload, numel), name="payload-check", daemon=True
        )
        self._thread.start()

    def _run(self, codec: Codec, payload: torch.Tensor, numel: int) -> None:
        finite = False  # a check that fails sends the payload on grpc, for the coordinator
        try:
            finite = decodes_finite(codec, payload, numel)
        finally:
            with self._lock:
                self._finite = finite
                on_bad = self._on_bad
            if not finite and on_bad is not None:
                on_bad()

    def when_bad(self, cancel: Callable[[], object]) -> None:
        """Call `cancel` once the payload is found bad (at once if it already is)."""
        with self._lock:
            self._on_bad = cancel
            bad = self._finite is False
        if bad:
            cancel()

    def raise_if_bad(self) -> None:
        if self._finite is False:
            raise _NotFinite()

    def require(self) -> None:
        """Wait for the check; _NotFinite if the payload is bad."""
        self._thread.join()
        self.raise_if_bad()


@dataclass(frozen=True)
class _MeanHome:
    """Where a round's mean goes: the payload's device, decoded into the caller's spent
    pseudo-gradient `spare_N` where that can take it (`DecodesMeanInto`)."""

    device: torch.device
    spare_N: torch.Tensor | None = None

    def decode(self, codec: Codec, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return decode_into(codec, payload, numel, self.spare_N).to(self.device)


def _read_session(path: Path | None) -> str:
    """The session saved by this island's previous process, if any."""
    if path is None or not path.is_file():
        return ""
    text = path.read_text().strip()
    return text if re.fullmatch(r"[0-9a-f]{32,64}", text) else ""
