"""The hivemind transport: islands find each other through a DHT and average peer to peer.

No server: every island runs a hivemind DHT node (with its libp2p daemon, p2pd) and an
averager. Each round, the islands at the same round with the same shared parameters meet under
one DHT key (run id + fingerprint + round + params_sha256) and run a butterfly all-reduce of
their pseudo-gradients, carried by our codec (`allreduce.py`). Islands with another model or
group settings use another DHT prefix and never meet.

Joining and catching up: each island serves the shared state after its last round (anchor and
outer momentum); a new or restarted island downloads the newest one when it joins, and an
island that finds the group ahead of it, or on other parameters, adopts the group's state
instead of averaging alone (`AverageResult.adopt`).

hivemind: https://github.com/learning-at-home/hivemind (1.1.12).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.utils.timed_storage import get_dht_time

from diloco.codecs.base import Codec
from diloco.shared_state import OuterOptimizer, SharedState, params_sha256
from diloco.transports.base import AverageResult
from diloco.transports.hivemind.allreduce import IslandAverager, IslandDHT
from diloco.transports.hivemind.compression import CodecCompression
from diloco.transports.hivemind.config import HivemindTransportConfig

log = logging.getLogger(__name__)

_PART_VALUES = 2**19  # elements per hivemind part (hivemind's default is 512 KiB)
_RECORD_TTL_S = 3600.0  # how long progress and fingerprint records stay in the DHT


@dataclass(frozen=True, kw_only=True)
class HivemindGroup:
    """What the islands of one run share: who they are and the outer step they apply."""

    run_id: str
    num_islands: int
    optimizer: OuterOptimizer
    """The outer step (to serve the state after a round); the island's own object."""
    min_islands: int = 1


class HivemindTransport:
    """One island's node in the group's DHT and averager.

    Args:
        settings: transport.hivemind.
        group: run id, group sizes and the outer step (to serve the state after a round).
        codec: the run's codec; block_size: its block (parts of the all-reduce are whole blocks).
        numel: elements of the shared parameter vector.
        rank: this island's index (logs only: hivemind peers are named by their peer id).
        identity_path: the private key file of this island's peer id.
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
    ):
        self.settings = settings
        self.group = group
        self.codec = codec
        self.numel = numel
        self.rank = rank
        self.num_islands = group.num_islands
        self.compression = CodecCompression(codec, block_size)
        self._run_key = re.sub(r"[^A-Za-z0-9_-]", "_", group.run_id)
        self._prefix = ""
        self._fingerprint: dict[str, str] = {}
        self._averager: IslandAverager | None = None
        self._buffer_N = torch.zeros(0)
        self._live: SharedState | None = None  # OuterSync's own tensors, updated in place
        self._served: SharedState | None = None  # the state a newcomer downloads
        self._pending: tuple[int, SharedState, torch.Tensor] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.dht = IslandDHT(
            initial_peers=list(settings.initial_peers)
            + _read_peers(settings.initial_peers_file, settings.averaging_timeout_s),
            start=True,
            host_maddrs=list(settings.host_maddrs),
            announce_maddrs=list(settings.announce_maddrs) or None,
            identity_path=identity_path,
            use_relay=settings.use_relay,
            use_auto_relay=settings.use_auto_relay,
            client_mode=settings.client_mode,
        )

    @property
    def visible_maddrs(self) -> list[str]:
        """The multiaddrs other islands can use as transport.hivemind.initial_peers."""
        return [str(maddr) for maddr in self.dht.get_visible_maddrs()]

    # -- Transport --------------------------------------------------------------------------

    def join(self, available_rounds: Sequence[int], fingerprint: Mapping[str, str]) -> int | None:
        """Enter the group of islands with this fingerprint; resume from our own checkpoint
        (the group's newer state, if any, comes next through `shared_state`)."""
        self._fingerprint = dict(fingerprint)
        digest = hashlib.sha256(json.dumps(self._fingerprint, sort_keys=True).encode())
        self._prefix = f"{self._run_key}_{digest.hexdigest()[:12]}"
        self._buffer_N = torch.zeros(self.numel)
        sigint = signal.getsignal(signal.SIGINT)
        self._averager = IslandAverager(
            [self._buffer_N],
            self.dht,
            start=True,
            prefix=self._prefix,
            target_group_size=self.group.num_islands,
            min_group_size=max(2, self.group.min_islands) if self.num_islands > 1 else 1,
            min_matchmaking_time=self.settings.matchmaking_s,
            request_timeout=self.settings.request_timeout_s,
            next_chunk_timeout=self.settings.next_chunk_timeout_s,
            allreduce_timeout=self.settings.averaging_timeout_s,
            compression=self.compression,
            part_size_bytes=self.compression.part_values(_PART_VALUES),
            allow_state_sharing=False,
            state_provider=self._state_for_peer,
        )
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)  # hivemind ignores SIGINT in its parent
        self.dht.store(
            f"{self._run_key}.fingerprints",
            {"prefix": self._prefix, "fingerprint": self._fingerprint},
            get_dht_time() + _RECORD_TTL_S,
            subkey=str(self.dht.peer_id),
        )
        reason = self._other_groups()
        if reason:
            log.warning("hivemind: %s; they will not average with this island", reason)
        return max(available_rounds) if available_rounds else None

    def shared_state(self, local: SharedState) -> SharedState | None:
        self._live = local
        self._serve(local.copy())
        group = self._download_state()
        if group is None:
            log.info("hivemind: no island serves a shared state yet: starting from this one's")
            return None
        local_sha = params_sha256(local.anchor)
        if group.round < local.round or (group.round, params_sha256(group.anchor)) == (
            local.round,
            local_sha,
        ):
            return None
        self._serve(group)
        return group

    def average(
        self,
        payload: torch.Tensor,
        weight: float,
        round: int,
        params_sha256: str | None = None,
    ) -> AverageResult:
        averager = self._require_averager()
        sha = params_sha256 or ""
        self._publish_progress(round, sha)
        if self._group_is_ahead(round, sha):
            adopted = self._adopt(round, sha, payload.numel())
            if adopted is not None:
                return adopted
        home = payload.device
        self._buffer_N.copy_(self.codec.decode(payload, self.numel).cpu())
        snapshot = _Snapshot(self._live)
        averager.set_group_bits(_group_bits(round, sha), wait=True)
        try:
            outcome = self._step(averager, round, sha, weight)
        except Exception as error:
            adopted = self._adopt(round, sha, payload.numel())
            if adopted is not None:
                return adopted
            raise RuntimeError(
                f"hivemind: round {round} found no group of at least "
                f"transport.min_islands={self.group.min_islands} island(s) "
                f"({type(error).__name__}: {error}){self._why_alone()}"
            ) from None
        gathered = outcome["gathered"]
        if any(value != {"round": round, "sha": sha} for value in gathered.values()):
            raise RuntimeError(f"hivemind: round {round} was averaged with islands on other state")
        mean_N = self._buffer_N.clone()
        self._after_round(round, snapshot, mean_N)
        if len(gathered) == 1 and self.num_islands > 1:
            log.warning("hivemind: round %d averaged alone%s", round, self._why_alone())
        return AverageResult(
            mean_N.to(home), len(gathered), outcome["bytes_sent"], outcome["bytes_received"]
        )

    def _step(
        self, averager: IslandAverager, round: int, sha: str, weight: float
    ) -> dict[str, Any]:
        """hivemind's matchmaking and our all-reduce; alone when no island came in time.

        hivemind forms a group of one at once (its first matchmaking timeout fires as soon as
        the peer declares itself), so groups need two; an island alone after twice the
        matchmaking window averages by itself when transport.min_islands is 1.
        """
        control = averager.step(
            gather={"round": round, "sha": sha},
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
            return {
                "gathered": {"self": {"round": round, "sha": sha}},
                "bytes_sent": 0,
                "bytes_received": 0,
            }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._averager is not None and self._averager.is_alive():
            self._averager.shutdown()
        if self.dht.is_alive():
            self.dht.shutdown()

    # -- shared state -----------------------------------------------------------------------

    def _serve(self, state: SharedState) -> None:
        with self._lock:
            self._served, self._pending = state, None
        averager = self._require_averager()
        averager.allow_state_sharing = not self.settings.client_mode
        if averager.allow_state_sharing:
            averager.state_sharing_priority = float(state.round)

    def _after_round(self, round: int, snapshot: _Snapshot, mean_N: torch.Tensor) -> None:
        """Serve the state after `round`: computed from the state before it and its mean only
        when a peer asks (the island applies the same step to its own copy meanwhile)."""
        before = snapshot.wait()
        if before is None:
            return
        with self._lock:
            self._pending = (round, before, mean_N)
        averager = self._require_averager()
        if averager.allow_state_sharing:
            averager.state_sharing_priority = float(round + 1)

    def _state_for_peer(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        # Runs in hivemind's helper thread of this process, when a peer downloads our state.
        with self._lock:
            if self._pending is not None:
                round, before, mean_N = self._pending
                outer_state = dict(before.outer_state)
                self.group.optimizer.step_(before.anchor, mean_N, outer_state, round)
                self._served = SharedState(round + 1, before.anchor, outer_state)
                self._pending = None
            state = self._served
        if state is None:
            return {}, []
        names = [name for name, _ in state.tensors()]
        metadata = {"round": state.round, "numel": self.numel, "tensors": names}
        return metadata, [tensor for _, tensor in state.tensors()]

    def _download_state(self) -> SharedState | None:
        averager = self._require_averager()
        answer = averager.load_state_from_peers(timeout=self.settings.state_timeout_s)
        if answer is None:
            return None
        metadata, tensors = answer
        names = metadata.get("tensors")
        if (
            metadata.get("numel") != self.numel
            or not isinstance(names, list)
            or len(names) != len(tensors)
            or not names
            or names[0] != "anchor"
            or any(t.numel() not in (self.numel, 1) for t in tensors)
            or tensors[0].numel() != self.numel
        ):
            log.warning("hivemind: a peer served a state of another shape: ignored")
            return None
        copied = {str(name): t.detach().clone() for name, t in zip(names, tensors, strict=True)}
        anchor_N = copied.pop("anchor").to(torch.float32).reshape(-1)
        return SharedState(int(metadata["round"]), anchor_N, copied)

    def _adopt(self, round: int, sha: str, sent: int) -> AverageResult | None:
        """The group's newer state, to adopt instead of this round's mean, or None."""
        group = self._download_state()
        if group is None or group.round < round:
            return None
        if group.round == round and params_sha256(group.anchor) == sha:
            return None
        log.warning(
            "hivemind: round %d: the group is at round %d, adopting its state", round, group.round
        )
        self._serve(group)
        empty = torch.zeros(0)
        return AverageResult(empty, 1, 0, 8 * self.numel, adopt=group)

    # -- progress records and diagnostics ----------------------------------------------------

    def _publish_progress(self, round: int, sha: str) -> None:
        # Not awaited: the record only needs to be there by the time a late island looks.
        self.dht.store(
            f"{self._prefix}.progress",
            [round, sha],
            get_dht_time() + _RECORD_TTL_S,
            subkey=str(self.dht.peer_id),
            return_future=True,
        )

    def _group_is_ahead(self, round: int, sha: str) -> bool:
        """Some island is past `round`, or most islands at `round` hold other parameters."""
        records = _records(self.dht.get(f"{self._prefix}.progress", latest=True))
        me = str(self.dht.peer_id)
        others = [value for peer, value in records.items() if peer != me]
        if any(int(other[0]) > round for other in others):
            return True
        counts = Counter([str(other[1]) for other in others if int(other[0]) == round] + [sha])
        best = max(counts.values())
        return min(s for s, n in counts.items() if n == best) != sha

    def _other_groups(self) -> str:
        """Why islands of this run would not meet this one ("" when none differ)."""
        records = _records(self.dht.get(f"{self._run_key}.fingerprints", latest=True))
        differing: set[str] = set()
        count = 0
        for value in records.values():
            if not isinstance(value, dict) or value.get("prefix") == self._prefix:
                continue
            theirs = value.get("fingerprint", {})
            count += 1
            keys = set(theirs) | set(self._fingerprint)
            differing |= {k for k in keys if theirs.get(k) != self._fingerprint.get(k)}
        if not count:
            return ""
        return (
            f"{count} island(s) of run {self.group.run_id!r} run another model or group settings "
            f"(they differ in: {', '.join(sorted(differing))})"
        )

    def _why_alone(self) -> str:
        reason = self._other_groups()
        if reason:
            return f": no other island with this fingerprint; {reason}"
        return (
            f": no other island of run {self.group.run_id!r} arrived within "
            f"transport.hivemind.matchmaking_s={self.settings.matchmaking_s}"
        )

    def _require_averager(self) -> IslandAverager:
        if self._averager is None:
            raise RuntimeError("hivemind transport: call join() first")
        return self._averager


class _Snapshot:
    """A copy of the shared state taken in the background while the round is averaged."""

    def __init__(self, live: SharedState | None):
        self._copy: SharedState | None = None
        self._thread: threading.Thread | None = None
        if live is not None:
            self._thread = threading.Thread(target=self._take, args=(live,), daemon=True)
            self._thread.start()

    def _take(self, live: SharedState) -> None:
        self._copy = live.copy()

    def wait(self) -> SharedState | None:
        if self._thread is not None:
            self._thread.join()
        return self._copy


def _group_bits(round: int, sha: str) -> str:
    """The DHT group key of a round: islands meet only at the same round on the same params."""
    digest = hashlib.sha256(f"{round}:{sha}".encode()).digest()[:8]
    return format(int.from_bytes(digest, "big"), "064b")


def _records(found: Any) -> dict[str, Any]:
    """{subkey: value} of a DHT dictionary record (hivemind wraps each in ValueWithExpiration)."""
    if found is None or not isinstance(found.value, dict):
        return {}
    return {str(key): item.value for key, item in found.value.items()}


def _read_peers(path: str, wait_s: float) -> list[str]:
    """The multiaddrs in `path`, waiting up to `wait_s` for it to appear (islands may start in
    any order: the first writes its hivemind.address_file)."""
    if not path:
        return []
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as file:
                peers = [line.strip() for line in file if line.strip()]
            if peers:
                return peers
        except FileNotFoundError:
            pass
        except OSError as error:
            raise ValueError(
                f"transport.hivemind.initial_peers_file {path!r} cannot be read: {error.strerror}"
            ) from None
        if time.monotonic() > deadline:
            raise ValueError(
                f"transport.hivemind.initial_peers_file {path!r} holds no multiaddr after "
                f"{wait_s:.0f} s: start the first island with hivemind.address_file={path}"
            )
        time.sleep(0.1)
