"""Who is in the group: joins, fingerprints, the session that binds a rank, leaving.

No grpc and no lock here: the coordinator calls in with its own lock held.

- The group's fingerprint is pinned by the coordinator's config when it has one
  (`transport.grpc.fingerprint_file`), otherwise set by the first island that joins; an island
  whose fingerprint differs is refused with the differing *keys* named (the values are the
  group's business: they are logged on the coordinator, escaped, and never sent to a caller).
- Joining hands the island a session secret; every later call must present it. A rank held by
  a live island (seen within `hold_s`) cannot be taken by another caller; an island restarted
  with its saved session takes its rank back at once, one without it once the rank is silent.
- Only hashes of sessions are kept (and persisted), so the coordinator's files reveal none.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diloco.transports.base import GroupMismatchError

log = logging.getLogger(__name__)


class RankHeld(GroupMismatchError):
    """Another live island holds the rank this caller asked for."""


@dataclass
class Member:
    active: bool = True
    """Expected in the next round (a member that missed a round is not, until it reports)."""
    left: bool = False
    last_seen: float = 0.0
    """Monotonic time of its last call."""
    session_sha256: str = ""
    host: str = ""
    last_round: int = -1
    """The last round it sent a payload for."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Its latest figures (train loss, tokens ...), for the status page."""
    bytes_received: int = 0
    """Payload bytes the coordinator received from it."""
    bytes_sent: int = 0
    """Bytes the coordinator sent it (means and states)."""


def session_hash(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()


class Membership:
    def __init__(self, islands: int, run_id: str, pinned: Mapping[str, str], hold_s: float):
        self.islands = islands
        self.run_id = run_id
        self.pinned = dict(pinned)
        self.hold_s = hold_s
        self.fingerprint: dict[str, str] | None = None
        self.members: dict[int, Member] = {}

    def join(
        self,
        rank: int,
        run_id: str,
        fingerprint: Mapping[str, str],
        *,
        session: str,
        host: str,
        now: float,
    ) -> str:
        """Register an island; returns the session it must present from now on.

        Raises:
            GroupMismatchError: another run, a rank out of range, or a differing fingerprint.
            RankHeld: another live island holds `rank`.
        """
        if run_id != self.run_id:
            raise GroupMismatchError(
                f"transport.run_id differs: the coordinator's is not {run_id!r}"
            )
        if not 0 <= rank < self.islands:
            raise GroupMismatchError(
                f"island rank {rank} is outside [0, transport.islands={self.islands})"
            )
        self._check_fingerprint(rank, fingerprint)
        member = self.members.get(rank)
        if member is not None and not member.left and member.session_sha256:
            presented = bool(session) and hmac.compare_digest(
                session_hash(session), member.session_sha256
            )
            silent_s = now - member.last_seen
            if not presented and silent_s < self.hold_s:
                raise RankHeld(
                    f"island rank {rank} is held by a live island (seen {silent_s:.0f} s ago); "
                    f"a restarted island presents its saved session, or waits {self.hold_s:.0f} s"
                )
            if presented:
                log.info("island %d joined again with its session (restarted)", rank)
            else:
                log.warning(
                    "island %d was silent for %.0f s: its rank is taken over", rank, silent_s
                )
        if self.fingerprint is None:
            self.fingerprint = dict(fingerprint)
        new_session = secrets.token_hex(16)
        fresh = Member(last_seen=now, session_sha256=session_hash(new_session), host=host[:128])
        if member is not None:  # the same island again: its history stays
            fresh.last_round, fresh.metrics = member.last_round, member.metrics
            fresh.bytes_received, fresh.bytes_sent = member.bytes_received, member.bytes_sent
        self.members[rank] = fresh
        return new_session

    def check(self, rank: int, session: str) -> Member | None:
        """The member `rank` when `session` is its session; None otherwise."""
        member = self.members.get(rank)
        if member is None or member.left or not session or not member.session_sha256:
            return None
        if not hmac.compare_digest(session_hash(session), member.session_sha256):
            return None
        return member

    def leave(self, rank: int) -> None:
        member = self.members.get(rank)
        if member is not None:
            member.left, member.active = True, False
            log.info("island %d left the group", rank)

    def active_count(self) -> int:
        return sum(1 for m in self.members.values() if m.active)

    def waiting_for(self, reported: set[int]) -> tuple[list[int], int]:
        """(active members that have not reported, islands that never joined)."""
        missing = [r for r, m in self.members.items() if m.active and r not in reported]
        return missing, self.islands - len(self.members)

    def everyone_left(self) -> bool:
        return bool(self.members) and all(m.left for m in self.members.values())

    def _check_fingerprint(self, rank: int, fingerprint: Mapping[str, str]) -> None:
        reference = dict(self.pinned)
        if self.fingerprint is not None:
            reference.update(self.fingerprint)
        differing = [key for key in sorted(reference) if reference[key] != fingerprint.get(key)]
        if differing:
            details = "; ".join(
                f"{key!r}: group {reference.get(key)!r}, island {fingerprint.get(key)!r}"
                for key in differing
            )
            log.error("refused island %d: its fingerprint differs: %s", rank, details)
            raise GroupMismatchError(
                f"island {rank} differs from the group and cannot join; differing keys: "
                + ", ".join(differing)
            )

    # -- persistence ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "members": {
                str(rank): {
                    "left": m.left,
                    "session_sha256": m.session_sha256,
                    "host": m.host,
                    "last_round": m.last_round,
                }
                for rank, m in self.members.items()
            },
        }

    def restore(self, saved: Mapping[str, Any], now: float) -> None:
        """Islands of the earlier run are expected back: rounds wait for them until they miss
        one; islands that left are known but not expected."""
        fingerprint = saved.get("fingerprint")
        self.fingerprint = None if fingerprint is None else dict(fingerprint)
        for rank, entry in saved.get("members", {}).items():
            left = bool(entry.get("left"))
            self.members[int(rank)] = Member(
                active=not left,
                left=left,
                last_seen=now,
                session_sha256=str(entry.get("session_sha256", "")),
                host=str(entry.get("host", "")),
                last_round=int(entry.get("last_round", -1)),
            )
