"""When a hivemind island adopts the group's shared state instead of averaging.

With no server, nobody closes a round for everyone: an island that arrives after the others
have averaged a round (it was slower than the matchmaking window), or whose shared parameters
differ from those of most islands at its round, would otherwise average alone and drift away
for good. Such an island downloads the group's newest shared state and takes it in place of
this round's mean (`AverageResult.adopt`); the rules are pure functions of what the progress
records (records.py) and the downloaded state say.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from diloco.shared_state import SharedState, params_sha256


def group_is_ahead(others: Sequence[tuple[int, str]], round: int, sha: str) -> bool:
    """Some island is past `round`, or most islands at `round` hold other parameters.

    Args:
        others: (round, params sha) of the other islands of the group.
        round, sha: this island's round and parameters' hash.

    Ties between parameter hashes go to the smallest hash, the same choice on every island.
    """
    if any(other_round > round for other_round, _ in others):
        return True
    counts = Counter([other_sha for other_round, other_sha in others if other_round == round])
    counts[sha] += 1
    best = max(counts.values())
    return min(s for s, n in counts.items() if n == best) != sha


def adopts(group: SharedState | None, round: int, sha: str) -> bool:
    """Whether to take `group` (the state a peer served) in place of this island's own at
    `round` on parameters `sha`: it is newer, or at the same round on other parameters. Used
    when an island joins and when the group is ahead of it."""
    if group is None or group.round < round:
        return False
    return group.round > round or params_sha256(group.anchor) != sha
