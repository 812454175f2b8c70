"""The run token of a hivemind group: peers prove they hold it before they are averaged with.

hivemind's own `AuthorizerBase` (hivemind.utils.auth) signs only the DHT's RPCs; the
averager's matchmaking, all-reduce and state download (hivemind 1.1.12) take no authorizer.
So the proofs here are HMAC-SHA256 tags (RFC 2104) over what each RPC already carries:

- a *member proof* binds the token to a peer id. libp2p authenticates peer ids (the secure
  channel proves the peer holds the id's private key), so a proof copied by another peer is
  worth nothing to it. Each island sends its proof in the data hivemind gathers at
  matchmaking (a leader refuses a follower without one; every member checks every other
  member's before the all-reduce starts) and stores it in the DHT (an island serves its state
  only to peers whose proof it finds there);
- a *record tag* authenticates what an island publishes in the DHT (progress, fingerprint)
  and the shared state it serves: records and states without a valid tag are ignored.

The group's DHT prefix also depends on the token (`group_tag`), so islands with another token,
or none, never look for the same group and cannot stall it; that prefix is no secret (it is in
the DHT's fingerprint records), which is why the proofs above are what keeps a peer out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from diloco.errors import ConfigError, read_text_file
from diloco.transports.hivemind.config import HivemindTransportConfig

_DOMAIN = "diloco-hivemind-v1"  # tags of this scheme are never valid for another use of the key
MIN_TOKEN_CHARS = 16


class RunToken:
    """The secret shared by a run's sites, and the tags it makes.

    Args:
        secret: the run token (never logged, never stored by this object's repr).
        run_key: the run id as it appears in DHT keys (tags of one run are not valid in another).
    """

    def __init__(self, secret: str, run_key: str):
        self._key = hashlib.sha256(secret.encode()).digest()
        self._run_key = run_key

    def __repr__(self) -> str:
        return f"RunToken(run_key={self._run_key!r})"

    def sign(self, *fields: object) -> str:
        """The tag of `fields` (JSON-serialisable values), as hex."""
        message = json.dumps([_DOMAIN, self._run_key, *fields], sort_keys=True).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def verify(self, tag: object, *fields: object) -> bool:
        """Whether `tag` is the tag of `fields` (compare_digest: the time taken says nothing
        about how much of a forged tag matched)."""
        return isinstance(tag, str) and hmac.compare_digest(tag, self.sign(*fields))

    def member_proof(self, peer_id: str) -> str:
        """What peer `peer_id` shows to be grouped with the run's other islands."""
        return self.sign("member", peer_id)

    def is_member(self, peer_id: str, proof: object) -> bool:
        return self.verify(proof, "member", peer_id)

    def group_tag(self) -> str:
        """A short public tag of the token, part of the group's DHT prefix."""
        return self.sign("group")[:12]


def read_run_token(settings: HivemindTransportConfig) -> str | None:
    """The run token from hivemind.token_file or the hivemind.token_env variable; None when
    neither is set (the run is not authenticated).

    Raises:
        ConfigError: a token is configured but missing, empty or shorter than 16 characters.
    """
    if settings.token_file:
        token = read_text_file("transport.hivemind.token_file", settings.token_file).strip()
        where = f"transport.hivemind.token_file {settings.token_file!r}"
    elif settings.token_env:
        token = os.environ.get(settings.token_env, "").strip()
        where = f"${settings.token_env} (transport.hivemind.token_env)"
    else:
        return None
    if not token:
        raise ConfigError(
            f"no run token: {where} is empty; every site of the run needs the same secret, "
            f"e.g. export {settings.token_env or 'DILOCO_TOKEN'}=$(openssl rand -hex 32)"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"the run token in {where} must be at least {MIN_TOKEN_CHARS} characters, "
            f"got {len(token)}"
        )
    return token
