"""hivemind's averager and DHT processes as an island runs them.

`IslandAverager` is hivemind's `DecentralizedAverager` with our exact all-reduce
(allreduce.py), our shared state (state.py), one group key per round, and the run token's
checks (auth.py): a leader refuses a follower without a member proof, every member checks
every other member's proof before the all-reduce starts (a peer without one never receives or
sends a part), an island stops asking a peer it refused to lead its group, and the state is
served only to peers whose proof is in the DHT. `IslandDHT` is hivemind's DHT process. Both
stop when the island dies and keep their unix sockets in the island's socket directory
(sockets.py).

hivemind: https://github.com/learning-at-home/hivemind (averaging/averager.py, 1.1.12).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import typing
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException
from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import as_aiter, azip

from diloco.transports.hivemind.allreduce import ExactAllReduceRunner
from diloco.transports.hivemind.auth import RunToken
from diloco.transports.hivemind.records import members_key, records_of

log = logging.getLogger(__name__)

# hivemind's servicer reads the rpc_* annotations at run time and recognises streams only by
# typing.AsyncIterator (collections.abc.AsyncIterator[...] would register a unary handler).
_Stream = typing.AsyncIterator


class IslandAverager(DecentralizedAverager):  # type: ignore[misc]
    """A `DecentralizedAverager` that runs `ExactAllReduceRunner`, serves our shared state and
    checks the run token.

    Args:
        state_provider: called in the island's process when a peer downloads the state:
            returns (metadata, tensors).
        token: the run token, or None (no checks).
        socket_prefix: where this process's unix sockets go (`SocketDir.p2p_prefix`).
        kwargs: `DecentralizedAverager`'s arguments (`compression` must be a CodecCompression).
    """

    def __init__(
        self,
        *args: Any,
        state_provider: Callable[[], tuple[dict[str, Any], Sequence[torch.Tensor]]],
        token: RunToken | None,
        socket_prefix: str,
        **kwargs: Any,
    ):
        self._state_provider = state_provider
        self._token = token
        self._socket_prefix = socket_prefix
        self._refused: set[PeerID] = set()  # lives in the averager process
        self._sender_order: dict[PeerID, tuple[int, str]] = {}
        self.last_bytes = (0, 0)
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        exit_with_parent(self._parent_pid)
        use_socket_prefix(self._socket_prefix)
        super().run()

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        metadata, tensors = self._state_provider()
        return metadata, tensors, None

    # -- the run token ------------------------------------------------------------------------

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> _Stream[averaging_pb2.MessageFromLeader]:
        if not self._holds_token(context.remote_id, request.gather, "asked to join a group"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> _Stream[averaging_pb2.DownloadData]:
        if self._token is not None:
            found = await self.dht.get(members_key(self.prefix), latest=True, return_future=True)
            proof = records_of(found).get(str(context.remote_id))
            if not self._token.is_member(str(context.remote_id), proof):
                self._refuse(context.remote_id, "asked for the shared state")
                return
        async for message in super().rpc_download_state(request, context):
            yield message

    def _holds_token(self, peer: PeerID, gathered: bytes, action: str) -> bool:
        if self._token is None:
            return True
        if self._token.is_member(str(peer), gathered_data(self.serializer, gathered).get("proof")):
            return True
        self._refuse(peer, action)
        return False

    def _refuse(self, peer: PeerID, action: str) -> None:
        if peer not in self._refused:
            log.warning("hivemind: peer %s %s without the run token: refused", peer, action)
        self._refused.add(peer)

    # -- one group key per round, the exact all-reduce ---------------------------------------------

    async def _step(self, *, step: Any, future_for_init: Any) -> None:
        matchmaking = self._matchmaking
        matchmaking.group_key_manager.update_key_on_group_assembled = _keep_group_key
        if self._token is not None and not hasattr(matchmaking, "_diloco_skips_refused"):
            matchmaking._request_join_group = _skipping(
                matchmaking._request_join_group, self._refused
            )
            matchmaking._diloco_skips_refused = True
        await super()._step(step=step, future_for_init=future_for_init)

    async def _aggregate_with_group(
        self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any
    ) -> dict[str, Any]:
        strangers = [
            peer
            for peer, gathered in zip(group_info.peer_ids, group_info.gathered, strict=True)
            if not self._holds_token(peer, gathered, "was in a group")
        ]
        if strangers:
            # Before any part moves: fail this attempt (hivemind's step looks for another group).
            error = AllreduceException(f"peers without the run token in the group: {strangers}")
            future = self._running_groups.get(group_info.group_id)
            if future is not None and not future.done():
                future.set_exception(error)  # ends the strangers' part streams at once
                future.exception()  # retrieved: asyncio need not log it
            raise error
        self._sender_order = {
            peer: sender_key(peer, gathered_data(self.serializer, gathered))
            for peer, gathered in zip(group_info.peer_ids, group_info.gathered, strict=True)
        }
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        sent, received = self.last_bytes
        return {
            "gathered": gathered,
            "bytes_sent": sent,
            "bytes_received": received,
            "refused": sorted(str(peer) for peer in self._refused),
        }

    async def _run_allreduce_inplace_(
        self,
        tensors: Sequence[torch.Tensor],
        group_info: GroupInfo,
        group_id: bytes | None = None,
        **kwargs: Any,
    ) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        runner = ExactAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            sender_order=self._sender_order,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("auxiliary peers receive no averages")
            return
        # The runner yields whole tensors once every span has arrived: a failed attempt
        # leaves `tensors` as they were, ready for the next attempt.
        async for tensor, mean in azip(as_aiter(*tensors), runner):
            tensor.copy_(mean)
        self.last_bytes = (runner.bytes_sent, runner.bytes_received)


class IslandDHT(DHT):  # type: ignore[misc]
    """hivemind's DHT process, which also stops (with its p2pd) when the island dies.

    Args:
        socket_prefix: where this process's unix sockets go (`SocketDir.p2p_prefix`).
        kwargs: `DHT`'s arguments.
    """

    def __init__(self, *args: Any, socket_prefix: str, **kwargs: Any):
        self._socket_prefix = socket_prefix
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        exit_with_parent(self._parent_pid)
        use_socket_prefix(self._socket_prefix)
        super().run()


def gathered_data(serializer: Any, gathered: bytes) -> dict[str, Any]:
    """Our part of a peer's gathered data (hivemind packs [bandwidth, mode, user data] with
    msgpack); {} when it holds none (whatever a peer sent, every peer reads it the same way)."""
    try:
        _, _, user_bytes = serializer.loads(gathered)
        data = serializer.loads(user_bytes)
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def sender_key(peer: PeerID, data: dict[str, Any]) -> tuple[int, str]:
    """Where a peer's part goes in a mean: by island rank (the order every transport sums in),
    then by peer id (the same order on every peer if two islands claim one rank)."""
    rank = data.get("rank")
    return (rank if isinstance(rank, int) else -1, str(peer))


async def _keep_group_key(group_info: GroupInfo) -> None:
    """hivemind moves a peer to another group key after each group; ours is chosen per round."""
    del group_info


def _skipping(
    request_join_group: Callable[[PeerID], Awaitable[Any]], refused: set[PeerID]
) -> Callable[[PeerID], Awaitable[Any]]:
    """hivemind's follower request, except to a leader refused for lacking the run token (it
    would be refused again after the group formed, and could keep the others from meeting)."""

    async def request(leader: PeerID) -> Any:
        if leader in refused:
            return None
        return await request_join_group(leader)

    return request


def use_socket_prefix(prefix: str) -> None:
    """In a forked helper process: create hivemind's unix sockets under `prefix`.

    hivemind names them from a class attribute (`P2P._UNIX_SOCKET_PREFIX`, /tmp/hivemind-); the
    helper process belongs to one island and runs nothing else, so setting it here moves
    exactly that island's sockets.
    """
    P2P._UNIX_SOCKET_PREFIX = prefix


def exit_with_parent(parent_pid: int) -> None:
    """In a forked helper process: when `parent_pid` dies (even by SIGKILL), stop our children
    (p2pd) and exit, so that nothing outlives the island."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        for child in _children(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children
