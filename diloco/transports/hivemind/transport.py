"""The hivemind transport: islands find each other through a DHT and average peer to peer.

No server: every island runs a hivemind DHT node (with its libp2p daemon, p2pd) and an
averager. Each round, the islands at the same round with the same shared parameters meet under
one DHT key (run id + fingerprint + round + params_sha256, records.py) and run a butterfly
all-reduce of their pseudo-gradients, carried by our codec (allreduce.py). Islands with another
model, group settings or run token use another DHT prefix and never meet; with a run token,
peers prove they hold it before they are grouped (auth.py).

Joining and catching up: each island serves the shared state after its last round (state.py);
a new or restarted island downloads the newest one when it joins, and an island that finds the
group ahead of it, or on other parameters, adopts the group's state instead of averaging alone
(adopt.py, `AverageResult.adopt`).

hivemind: https://github.com/learning-at-home/hivemind (1.1.12).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diloco.codecs.base import Codec
from diloco.shared_state import OuterOptimizer, SharedState, params_sha256
from diloco.transports.base import AverageResult
from diloco.transports.hivemind.adopt import adopts, group_is_ahead
from diloco.transports.hivemind.auth import RunToken
from diloco.transports.hivemind.averager import IslandAverager
from diloco.transports.hivemind.compression import CodecCompression
from diloco.transports.hivemind.config import HivemindTransportConfig
from diloco.transports.hivemind.connect import start_dht
from diloco.transports.hivemind.records import GroupRecords, group_bits, group_prefix, run_key
from diloco.transports.hivemind.sockets import SocketDir
from diloco.transports.hivemind.state import Snapshot, StateServer
from diloco.transports.hivemind.status import IslandStatusRecord, is_lead_lane

log = logging.getLogger(__name__)

_PART_VALUES = 2**19  # elements per hivemind part (hivemind's default is 512 KiB)


@dataclass(frozen=True, kw_only=True)
class HivemindGroup:
    """What the islands of one run share: who they are, the outer step, the run token."""

    run_id: str
    num_islands: int
    optimizer: OuterOptimizer
    """The outer step (to serve the state after a round); the island's own object."""
    min_islands: int = 1
    token: str | None = field(default=None, repr=False)
    """The run token (auth.read_run_token), or None: peers are not authenticated."""


class HivemindTransport:
    """One island's node in the group's DHT and averager.

    Args:
        settings: transport.hivemind.
        group: run id, group sizes, the outer step and the run token.
        codec: the run's codec; block_size: its block (parts of the all-reduce are whole blocks).
        numel: elements of the shared parameter vector.
        rank: this island's index (logs only: hivemind peers are named by their peer id).
        identity_path: the private key file of this island's peer id.
        lane: which of the island's exchanges this is (a Streaming DiLoCo fragment): lanes
            meet under their own DHT key.
    """

    def __init__(
        self,
        settings: HivemindTransportConfig,
        group: HivemindGroup,
        codec: Codec,
        *,
        numel: int,
        rank: int,
        identity_path: str,
        block_size: int = 1,
        lane: str = "",
    ):
        self.settings = settings
        self.lane = lane
        self.group = group
        self.codec = codec
        self.numel = numel
        self.rank = rank
        self.num_islands = group.num_islands
        self.compression = CodecCompression(codec, block_size)
        self.token = RunToken(group.token, run_key(group.run_id)) if group.token else None
        self.refused_peers: set[str] = set()
        """Peer ids this island refused for lacking the run token (as of its last average)."""
        self.status = IslandStatusRecord(rank, lane)
        """What this island publishes for `diloco-island status` (status.py)."""
        self._state = StateServer(
            group.optimizer, numel, self.token, serving=not settings.client_mode
        )
        self._records: GroupRecords | None = None
        self._averager: IslandAverager | None = None
        self._buffer_N = torch.zeros(0)
        self._closed = False
        self.sockets = SocketDir()
        try:
            self.dht = start_dht(settings, identity_path, self.sockets.p2p_prefix)
        except BaseException:
            self.sockets.close()
            raise

    @property
    def visible_maddrs(self) -> list[str]:
        """The multiaddrs other islands can use as transport.hivemind.initial_peers."""
        return [str(maddr) for maddr in self.dht.get_visible_maddrs()]

    # -- Transport --------------------------------------------------------------------------

    def join(self, available_rounds: Sequence[int], fingerprint: Mapping[str, str]) -> int | None:
        """Enter the group of islands with this fingerprint; resume from our own checkpoint
        (the group's newer state, if any, comes next through `shared_state`)."""
        if self.lane:  # each lane (fragment) is a group of its own
            fingerprint = {**fingerprint, "lane": self.lane}
        prefix = group_prefix(run_key(self.group.run_id), fingerprint, self.token)
        if self._records is None or self._records.prefix != prefix:
            self._start_averager(prefix)
        self._records = GroupRecords(self.dht, self.group.run_id, prefix, fingerprint, self.token)
        self._records.publish_membership()
        reason = self._records.other_groups()
        if reason:
            log.warning("hivemind: %s; they will not average with this island", reason)
        return max(available_rounds) if available_rounds else None

    def shared_state(self, local: SharedState) -> SharedState | None:
        averager = self._require_averager()
        self._state.live = local
        self._state.serve(local.copy(), averager)
        group = self._state.download(averager, self.settings.state_timeout_s)
        if group is None:
            log.info("hivemind: no island serves a shared state yet: starting from this one's")
            return None
        if not adopts(group, local.round, params_sha256(local.anchor)):
            return None
        self._state.serve(group, averager)
        return group

    def average(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None = None,
    ) -> AverageResult:
        averager = self._require_averager()
        records = self._require_records()
        sha = params_sha256 or ""
        records.publish_progress(round, sha)
        self.status.note_hash(round, sha)
        self._publish_status()
        if group_is_ahead(records.others_progress(), round, sha):
            adopted = self._adopt(round, sha)
            if adopted is not None:
                return adopted
        home = payload.device
        self._buffer_N.copy_(self.codec.decode(payload, self.numel).cpu())
        snapshot = Snapshot(self._state.live)
        averager.set_group_bits(group_bits(round, sha), wait=True)
        try:
            outcome = self._step(averager, round, sha, weight)
        except Exception as error:
            adopted = self._adopt(round, sha)
            if adopted is not None:
                return adopted
            raise RuntimeError(
                f"hivemind: round {round} found no group of at least "
                f"transport.min_islands={self.group.min_islands} island(s) "
                f"({type(error).__name__}: {error}){self._why_alone()}"
            ) from None
        gathered = outcome["gathered"]
        if not all(_same_round(value, round, sha) for value in gathered.values()):
            raise RuntimeError(f"hivemind: round {round} was averaged with islands on other state")
        self.refused_peers.update(outcome.get("refused", ()))
        mean_N = self._buffer_N.clone()
        self._state.after_round(round, snapshot, mean_N, averager)
        if len(gathered) == 1 and self.num_islands > 1:
            log.warning("hivemind: round %d averaged alone%s", round, self._why_alone())
        self.status.note_result(len(gathered), outcome["bytes_sent"], outcome["bytes_received"])
        return AverageResult(
            mean_N.to(home), len(gathered), outcome["bytes_sent"], outcome["bytes_received"]
        )

    def note_metrics(self, metrics: Mapping[str, float]) -> None:
        """This island's latest metrics row (islands/loop.py), published with its status."""
        self.status.note_row(metrics)
        self._publish_status()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._averager is not None and self._averager.is_alive():
                self._averager.shutdown()
            if self.dht.is_alive():
                self.dht.shutdown()
        finally:
            self.sockets.close()

    # -- averaging --------------------------------------------------------------------------

    def _start_averager(self, prefix: str) -> None:
        if self._averager is not None and self._averager.is_alive():
            self._averager.shutdown()  # joined again with another fingerprint
        self._buffer_N = torch.zeros(self.numel)
        sigint = signal.getsignal(signal.SIGINT)
        self._averager = IslandAverager(
            [self._buffer_N],
            self.dht,
            start=True,
            prefix=prefix,
            target_group_size=self.group.num_islands,
            min_group_size=max(2, self.group.min_islands) if self.num_islands > 1 else 1,
            min_matchmaking_time=self.settings.matchmaking_s,
            request_timeout=self.settings.request_timeout_s,
            next_chunk_timeout=self.settings.next_chunk_timeout_s,
            allreduce_timeout=self.settings.averaging_timeout_s,
            compression=self.compression,
            part_size_bytes=self.compression.part_values(_PART_VALUES),
            allow_state_sharing=False,
            state_provider=self._state.state_for_peer,
            token=self.token,
            socket_prefix=self.sockets.p2p_prefix,
        )
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)  # hivemind ignores SIGINT in its parent

    def _step(
        self, averager: IslandAverager, round: int, sha: str, weight: float
    ) -> dict[str, Any]:
        """hivemind's matchmaking and our all-reduce; alone when no island came in time.

        hivemind forms a group of one at once (its first matchmaking timeout fires as soon as
        the peer declares itself), so groups need two; an island alone after twice the
        matchmaking window averages by itself when transport.min_islands is 1.
        """
        gather: dict[str, Any] = {"round": round, "sha": sha, "rank": self.rank}
        if self.token is not None:
            gather["proof"] = self.token.member_proof(str(self.dht.peer_id))
        control = averager.step(
            gather=gather,
            weight=float(weight),
            timeout=self.settings.averaging_timeout_s,
            wait=False,
        )
        alone_at = time.monotonic() + 2 * self.settings.matchmaking_s
        may_go_alone = self.group.min_islands == 1 or self.num_islands == 1
        while not control.done():
            if may_go_alone and time.monotonic() > alone_at and not control.began_allreduce:
                break
            time.sleep(0.005)
        else:
            return dict(control.result())
        control.cancel()
        try:  # a group may have formed at the last moment: then its result stands
            return dict(control.result(timeout=self.settings.averaging_timeout_s))
        except BaseException:
            return {"gathered": {"self": gather}, "bytes_sent": 0, "bytes_received": 0}

    def _adopt(self, round: int, sha: str) -> AverageResult | None:
        """The group's newer state, to adopt instead of this round's mean, or None."""
        averager = self._require_averager()
        group = self._state.download(averager, self.settings.state_timeout_s)
        if group is None or not adopts(group, round, sha):
            return None
        log.warning(
            "hivemind: round %d: the group is at round %d, adopting its state", round, group.round
        )
        self._state.serve(group, averager)
        empty = torch.zeros(0)
        return AverageResult(empty, 1, 0, 8 * self.numel, adopt=group)

    def _publish_status(self) -> None:
        # One record per island: its lead lane's (the others carry fragments of its rounds).
        if self._records is not None and is_lead_lane(self.lane):
            self._records.publish_status(self.status.value())

    def _why_alone(self) -> str:
        return self._require_records().why_alone(self.settings.matchmaking_s)

    def _require_averager(self) -> IslandAverager:
        if self._averager is None:
            raise RuntimeError("hivemind transport: call join() first")
        return self._averager

    def _require_records(self) -> GroupRecords:
        if self._records is None:
            raise RuntimeError("hivemind transport: call join() first")
        return self._records


def _same_round(gathered: Any, round: int, sha: str) -> bool:
    """Whether a group member's gathered data names this round and these parameters."""
    return isinstance(gathered, dict) and (gathered.get("round"), gathered.get("sha")) == (
        round,
        sha,
    )
