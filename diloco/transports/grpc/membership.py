"""Who is in the group: joins, fingerprints, the session that binds a rank, leaving.

No grpc and no lock here: the coordinator calls in with its own lock held.

- The group's fingerprint is pinned by the coordinator's config when it has one
  (`transport.grpc.fingerprint_file`), otherwise set by the first island that joins; an island
  whose fingerprint differs is refused with the differing *keys* named (the values are the
  group's business: they are logged on the coordinator, escaped, and never sent to a caller).
- A join binds the rank to a session secret: the island's own (made once and kept in its
  run.dir, so a retried or restarted join presents the same one) or, when it offers none, one
  the coordinator makes. Every later call must present it. A rank held by an island cannot be
  taken by another caller while that island is active (it has not missed a round) or was seen
  within `hold_s`; an island restarted with its saved session takes its rank back at once.
- Only hashes of sessions are kept (and persisted), so the coordinator's files reveal none.
- Everything a join carries is bounded (entries, lengths) and the `parameters` entry must be a
  count, before any of it is kept or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diloco.transports.base import GroupMismatchError

log = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"
"""The fingerprint entry holding the number of shared parameters (what a state must have)."""
INITIAL_WEIGHTS_KEY = "initial weights"
"""The fingerprint entry holding the first 16 hex digits of the initial anchor's sha256."""
MAX_FINGERPRINT_ENTRIES = 64
MAX_FINGERPRINT_CHARS = 1024
"""Per key and per value: far above any real fingerprint entry."""
MAX_PARAMETERS = 1 << 40
_COUNT = re.compile(r"[1-9][0-9]{0,15}")
_SESSION = re.compile(r"[0-9a-f]{32,64}")


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


def parse_count(text: str) -> int | None:
    """A positive decimal count of at most MAX_PARAMETERS (ASCII digits only), else None."""
    if not _COUNT.fullmatch(text):
        return None
    count = int(text)
    return count if count <= MAX_PARAMETERS else None


def check_fingerprint_shape(fingerprint: Mapping[str, str]) -> None:
    """Refuse a fingerprint too large to keep or log, or whose `parameters` is not a count.

    Raises:
        GroupMismatchError: naming the entry (escaped and cut short) and the bound.
    """
    if len(fingerprint) > MAX_FINGERPRINT_ENTRIES:
        raise GroupMismatchError(
            f"a fingerprint has at most {MAX_FINGERPRINT_ENTRIES} entries, got {len(fingerprint)}"
        )
    for key, value in fingerprint.items():
        if len(key) > MAX_FINGERPRINT_CHARS or len(value) > MAX_FINGERPRINT_CHARS:
            raise GroupMismatchError(
                f"fingerprint entry {key[:40]!r} is longer than at most "
                f"{MAX_FINGERPRINT_CHARS} characters per key and value"
            )
    parameters = fingerprint.get(PARAMETERS_KEY)
    if parameters is not None and parse_count(parameters) is None:
        raise GroupMismatchError(
            f"fingerprint entry {PARAMETERS_KEY!r} must be a count in [1, 2^40], "
            f"got {parameters[:40]!r}"
        )


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
                f"transport.run_id differs: the coordinator's is not {run_id[:64]!r}"
            )
        if not 0 <= rank < self.islands:
            raise GroupMismatchError(
                f"island rank {rank} is outside [0, transport.islands={self.islands})"
            )
        check_fingerprint_shape(fingerprint)
        self._check_fingerprint(rank, fingerprint)
        member = self.members.get(rank)
        again = False  # the island that holds the rank, joining again
        if member is not None and not member.left and member.session_sha256:
            again = self._check_takeover(rank, member, session, now)
        if self.fingerprint is None:
            self.fingerprint = dict(fingerprint)
        # The island's own secret when it offers one (a retried join, whose answer was lost,
        # then presents the session it is bound to); otherwise one made here.
        new_session = session if _SESSION.fullmatch(session) else secrets.token_hex(16)
        fresh = Member(last_seen=now, session_sha256=session_hash(new_session), host=host[:128])
        if member is not None:  # the rank's history stays
            # A join is not a report: an island joining again is expected by rounds only if
            # it was (else a member could make every round wait for its deadline by joining).
            fresh.active = member.active or not again
            fresh.last_round, fresh.metrics = member.last_round, member.metrics
            fresh.bytes_received, fresh.bytes_sent = member.bytes_received, member.bytes_sent
        self.members[rank] = fresh
        return new_session

    def _check_takeover(self, rank: int, member: Member, session: str, now: float) -> bool:
        """Whether `session` is the member's (the same island joins again); False when another
        island may take the rank: the member is gone (it missed a round, so it is inactive,
        and was silent for `hold_s`). Raises RankHeld otherwise."""
        presented = _SESSION.fullmatch(session) is not None and hmac.compare_digest(
            session_hash(session), member.session_sha256
        )
        if presented:
            log.info("island %d joined again with its session (restarted)", rank)
            return True
        silent_s = now - member.last_seen
        if member.active or silent_s < self.hold_s:
            raise RankHeld(
                f"island rank {rank} is held by a live island; a restarted island presents its "
                f"saved session, another one waits until the rank missed a round and was "
                f"silent for {self.hold_s:.0f} s"
            )
        log.warning("island %d was silent for %.0f s: its rank is taken over", rank, silent_s)
        return False

    def check(self, rank: int, session: str) -> Member | None:
        """The member `rank` when `session` is its session; None otherwise."""
        member = self.members.get(rank)
        if member is None or member.left or not member.session_sha256:
            return None
        if not _SESSION.fullmatch(session):
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

    def mark_missing(self, reported: set[int]) -> list[int]:
        """Active members that did not report a round that closed: inactive until they do."""
        missing, _ = self.waiting_for(reported)
        for rank in missing:
            self.members[rank].active = False
        return missing

    def everyone_left(self, but: int | None = None) -> bool:
        """Every member (but `but`) has left; False while nobody joined."""
        others = [m for rank, m in self.members.items() if rank != but]
        return bool(self.members) and all(m.left for m in others)

    def _check_fingerprint(self, rank: int, fingerprint: Mapping[str, str]) -> None:
        reference = dict(self.pinned)
        keys = set(reference)
        if self.fingerprint is not None:
            reference.update(self.fingerprint)
            keys = set(reference) | set(fingerprint)  # once the group is set: the same keys
        differing = [key for key in sorted(keys) if reference.get(key) != fingerprint.get(key)]
        if differing:
            details = "; ".join(
                f"{_short(key)}: group {_short(reference.get(key))}, "
                f"island {_short(fingerprint.get(key))}"
                for key in differing
            )
            log.error("refused island %d: its fingerprint differs: %s", rank, details)
            raise GroupMismatchError(
                f"island {rank} differs from the group and cannot join; differing keys: "
                + ", ".join(key if key.isprintable() else _short(key, 40) for key in differing)
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


def _short(value: str | None, limit: int = 200) -> str:
    """`value` for a log line: escaped (`repr`), and cut short."""
    if value is None or len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
