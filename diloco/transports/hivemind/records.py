"""What islands publish in the DHT and read back: their group's key, fingerprint and progress.

Islands of a run meet under DHT keys derived from the run id, a hash of the group fingerprint
(model shapes, initial weights, group settings) and, with a run token, a public tag of the
token (`group_prefix`); a round's all-reduce bucket adds the round and the hash of the shared
parameters (`group_bits`). Each island also stores, under its peer id (a DHT subkey):

- `<run>.fingerprints`: its group prefix and fingerprint, so an island alone can say which
  settings differ from the other islands of the run;
- `<prefix>.progress`: the round it is averaging and its parameters' hash, which the adopt
  policy reads (adopt.py);
- `<prefix>.members`: its member proof, which a peer checks before serving it the state;
- `<run>.status`: its status record for `diloco-island status` (status.py: a few figures and
  its recent rows; readers of older versions never look at this key).

With a run token each record carries a tag (auth.py) and records without a valid one are
ignored: a peer without the token can write records but cannot steer an island with them.

hivemind DHT: https://github.com/learning-at-home/hivemind (dht/, 1.1.12).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from hivemind.dht import DHT
from hivemind.utils.timed_storage import get_dht_time

from diloco.transports.hivemind.auth import RunToken

RECORD_TTL_S = 3600.0  # how long records stay in the DHT


def run_key(run_id: str) -> str:
    """The run id as a DHT key component (hivemind prefixes may not contain dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", run_id)


def group_prefix(run: str, fingerprint: Mapping[str, str], token: RunToken | None) -> str:
    """The DHT prefix of the islands with this fingerprint (and this token, if any)."""
    digest = hashlib.sha256(json.dumps(dict(fingerprint), sort_keys=True).encode())
    prefix = f"{run}_{digest.hexdigest()[:12]}"
    return f"{prefix}_{token.group_tag()}" if token is not None else prefix


def group_bits(round: int, sha: str) -> str:
    """The DHT group key of a round: islands meet only at the same round on the same params."""
    digest = hashlib.sha256(f"{round}:{sha}".encode()).digest()[:8]
    return format(int.from_bytes(digest, "big"), "064b")


def members_key(prefix: str) -> str:
    return f"{prefix}.members"


class GroupRecords:
    """This island's records in the DHT, and its reading of the others'.

    Args:
        dht: this island's DHT node.
        run_id: transport.run_id; prefix: this island's group prefix.
        fingerprint: this island's group fingerprint.
        token: the run token, or None (records carry no tag and none is checked).
    """

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        prefix: str,
        fingerprint: Mapping[str, str],
        token: RunToken | None,
    ):
        self.dht = dht
        self.run_id = run_id
        self.prefix = prefix
        self.fingerprint = dict(fingerprint)
        self.token = token
        self.peer_id = str(dht.peer_id)
        self._run = run_key(run_id)

    def publish_membership(self) -> None:
        """Store this island's fingerprint (and member proof); waits until stored, so that a
        peer asked for its state right after finds the proof."""
        value: dict[str, Any] = {"prefix": self.prefix, "fingerprint": self.fingerprint}
        if self.token is not None:
            value["tag"] = self.token.sign("fingerprint", self.peer_id, value)
            self._store(members_key(self.prefix), self.token.member_proof(self.peer_id))
        self._store(f"{self._run}.fingerprints", value)

    def publish_progress(self, round: int, sha: str) -> None:
        # Not awaited: the record only needs to be there by the time a late island looks.
        value: list[Any] = [round, sha]
        if self.token is not None:
            value.append(self.token.sign("progress", self.peer_id, round, sha))
        self._store(f"{self.prefix}.progress", value, wait=False)

    def publish_status(self, value: dict[str, Any]) -> None:
        """This island's status record (status.py), replacing its previous one; not awaited."""
        if self.token is not None:
            value = {**value, "tag": self.token.sign("status", self.peer_id, value)}
        self._store(status_key(self._run), value, wait=False)

    def others_progress(self) -> list[tuple[int, str]]:
        """(round, params sha) of every other island of this group that published one."""
        found = []
        for peer, value in records_of(self.dht.get(f"{self.prefix}.progress", latest=True)).items():
            if peer == self.peer_id or not isinstance(value, list) or len(value) < 2:
                continue
            round, sha = value[0], value[1]
            if not isinstance(round, int) or not isinstance(sha, str):
                continue
            if self.token is not None and not self.token.verify(
                value[2] if len(value) > 2 else None, "progress", peer, round, sha
            ):
                continue
            found.append((round, sha))
        return found

    def other_groups(self) -> str:
        """Why islands of this run would not meet this one ("" when none differ)."""
        records = records_of(self.dht.get(f"{self._run}.fingerprints", latest=True))
        differing: set[str] = set()
        count = other_token = 0
        for peer, value in records.items():
            if not isinstance(value, dict) or value.get("prefix") == self.prefix:
                continue
            if not self._authentic(peer, value):
                other_token += 1
                continue
            theirs = value.get("fingerprint", {})
            if not isinstance(theirs, dict):
                continue
            count += 1
            keys = set(theirs) | set(self.fingerprint)
            differing |= {k for k in keys if theirs.get(k) != self.fingerprint.get(k)}
        reasons = []
        if count:
            reasons.append(
                f"{count} island(s) of run {self.run_id!r} run another model or group "
                f"settings (they differ in: {', '.join(sorted(differing))})"
            )
        if other_token:
            reasons.append(
                f"{other_token} island(s) of run {self.run_id!r} hold another run token, or "
                "none (transport.hivemind.token_env / token_file)"
            )
        return "; ".join(reasons)

    def why_alone(self, matchmaking_s: float) -> str:
        reason = self.other_groups()
        if reason:
            return f": no other island with this fingerprint; {reason}"
        return (
            f": no other island of run {self.run_id!r} arrived within "
            f"transport.hivemind.matchmaking_s={matchmaking_s}"
        )

    def _authentic(self, peer: str, value: dict[str, Any]) -> bool:
        tag = value.get("tag")
        if self.token is None:
            return tag is None
        body = {"prefix": value.get("prefix"), "fingerprint": value.get("fingerprint")}
        return self.token.verify(tag, "fingerprint", peer, body)

    def _store(self, key: str, value: Any, wait: bool = True) -> None:
        self.dht.store(
            key,
            value,
            get_dht_time() + RECORD_TTL_S,
            subkey=self.peer_id,
            return_future=not wait,
        )


def status_key(run: str) -> str:
    return f"{run}.status"


def read_status_records(
    dht: DHT, run_id: str, token: RunToken | None
) -> tuple[dict[str, dict[str, Any]], int]:
    """({peer id: status record} of the run's islands, how many records were left out for a
    missing or invalid tag)."""
    found = records_of(dht.get(status_key(run_key(run_id)), latest=True))
    records: dict[str, dict[str, Any]] = {}
    untagged = 0
    for peer, value in found.items():
        if not isinstance(value, dict):
            continue
        body = {key: item for key, item in value.items() if key != "tag"}
        if token is None or token.verify(value.get("tag"), "status", peer, body):
            records[peer] = body
        else:
            untagged += 1
    return records, untagged


def records_of(found: Any) -> dict[str, Any]:
    """{subkey: value} of a DHT dictionary record (hivemind wraps each in ValueWithExpiration)."""
    if found is None or not isinstance(found.value, dict):
        return {}
    return {str(key): item.value for key, item in found.value.items()}
