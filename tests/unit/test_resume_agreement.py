"""The round a restarted island of several ranks starts at (islands/resume.py).

Each rank brings (its own checkpoint's round, its shard group's round); the groups of a
site that died between its ranks' payloads are a round apart.
"""

from __future__ import annotations

import pytest

from islands.resume import _agreed_start


@pytest.mark.parametrize(
    ("offers", "start"),
    [
        ([(3, 3)], 3),  # one rank, nothing to adopt
        ([(1, 4)], 4),  # one rank adopts its group's newer state
        ([(4, 2)], 2),  # one rank: the group's state wins, as before multi-rank islands
        ([(1, 3), (1, 3)], 3),  # the groups agree: every rank adopts
        ([(3, 3), (1, 3)], 3),  # rank 0 holds it already, rank 1 adopts
        # The site died after rank 0's payload of round 2 and before rank 1's: shard 0's group
        # closed round 2, shard 1's waits for it. Rank 0 stays at round 1 and sends round 2
        # again; rank 1 sends it for the first time.
        ([(1, 2), (1, 1)], 1),
        ([(1, 1), (1, 2), (1, 2)], 1),
    ],
)  # fmt: skip
def test_the_ranks_start_at_the_lowest_round_every_rank_can_reach(
    offers: list[tuple[int, int]], start: int
) -> None:
    assert _agreed_start(offers) == start


@pytest.mark.parametrize(
    "offers",
    [
        [(0, 2), (0, 1)],  # rank 0 would need its state of round 1, which it never held
        [(1, 3), (1, 2)],
    ],
)
def test_groups_that_no_round_reconciles_are_refused(offers: list[tuple[int, int]]) -> None:
    assert _agreed_start(offers) is None
