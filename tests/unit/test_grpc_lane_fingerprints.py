"""Every lane of a grpc run holds islands of one fingerprint (grpc/lanes.py).

A site of one rank joins the main lane, a site of two ranks joins lanes shard-0 and shard-1:
without a check across lanes each would wait for the other forever.
"""

from __future__ import annotations

import pytest

from diloco.transports.base import GroupMismatchError
from diloco.transports.grpc.lanes import LaneRegistry, lane_fingerprint
from tests.unit.test_grpc_lanes import PINNED, join, main_coordinator

pytestmark = pytest.mark.timeout(30)

ONE_RANK = {**PINNED, "island.ranks, parallel": "1, none"}
TWO_RANKS = {**PINNED, "island.ranks, parallel": "2, ddp"}


def test_a_site_of_other_ranks_is_refused_in_whichever_lane_it_joins() -> None:
    registry = LaneRegistry(main_coordinator(), max_lanes=4)
    registry.join("", join(0, 100, ONE_RANK), ONE_RANK)
    shard = lane_fingerprint(TWO_RANKS, 50)
    with pytest.raises(GroupMismatchError, match="island.ranks, parallel"):
        registry.join("shard-0", join(1, 50, shard), shard)
    assert registry.get("shard-0") is None  # nothing allocated for the refused join


def test_lanes_of_one_run_accept_islands_of_its_fingerprint_whatever_their_size() -> None:
    registry = LaneRegistry(main_coordinator(), max_lanes=4)
    for rank in (0, 1):
        for lane, numel in (("shard-0", 50), ("shard-1", 49)):
            shard = lane_fingerprint(TWO_RANKS, numel)
            registry.join(lane, join(rank, numel, shard), shard)
    assert sorted(registry.get("shard-1").membership.members) == [0, 1]  # type: ignore[union-attr]
    with pytest.raises(GroupMismatchError, match="island.ranks, parallel"):
        registry.join("shard-0", join(1, 50, ONE_RANK), ONE_RANK)
