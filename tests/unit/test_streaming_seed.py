"""StreamingSync.seed_groups: each fragment's exchange group gets its first state from an
island, or gives its state to an island that joins late (diloco/outer/streaming.py)."""

from __future__ import annotations

import torch

from diloco.codecs import build_codec
from diloco.outer.optimizers import SgdOuter
from diloco.outer.streaming import InFlight, StreamingSync, StreamPlan
from diloco.shared_state import SharedState, params_sha256
from diloco.transports.base import AverageResult

PLAN = StreamPlan(fragments=2, inner_steps=4, overlap_steps=1, mix=0.5)


class Lane:
    """A fragment's group that keeps a shared state (the grpc lane's behaviour): the first
    island's state seeds it; later ones get it unless they hold it already."""

    def __init__(self, state: SharedState | None = None) -> None:
        self.state = state
        self.seeded = 0

    def shared_state(self, local: SharedState) -> SharedState | None:
        if self.state is None:
            self.state, self.seeded = local.copy(), self.seeded + 1
            return None
        same = params_sha256(self.state.anchor) == params_sha256(local.anchor)
        return None if same and self.state.round == local.round else self.state.copy()

    def average(self, payload: torch.Tensor, weight: float, round: int, sha: str | None = None):  # type: ignore[no-untyped-def]
        raise AssertionError("no exchange in these tests")

    def close(self) -> None: ...


def _sync(lanes: list[Lane]) -> tuple[StreamingSync, list[torch.Tensor]]:
    params = [torch.arange(6, dtype=torch.float32), torch.ones(4)]
    sync = StreamingSync(
        params,
        [[0], [1]],
        lanes,
        build_codec("none"),
        SgdOuter(lr=0.7, momentum=0.9, nesterov=True),
        PLAN,
    )
    return sync, params


def test_the_first_island_seeds_every_fragments_group_with_its_own_slice() -> None:
    lanes = [Lane(), Lane()]
    sync, params = _sync(lanes)
    assert sync.seed_groups() is False
    assert [lane.seeded for lane in lanes] == [1, 1]
    assert torch.equal(lanes[0].state.anchor, params[0])  # type: ignore[union-attr]
    assert torch.equal(lanes[1].state.anchor, params[1])  # type: ignore[union-attr]


def test_a_late_island_adopts_each_groups_newer_state() -> None:
    group = SharedState(3, torch.full((6,), 2.0), {"momentum": torch.full((6,), 0.5)})
    sync, params = _sync([Lane(group), Lane()])
    assert sync.seed_groups() is True
    fragment = sync.fragments[0]
    assert fragment.syncs == 3 and torch.equal(fragment.anchor_N, group.anchor)
    assert torch.equal(params[0], group.anchor)  # the replica starts from the shared fragment
    assert torch.equal(fragment.outer_state["momentum"], group.outer_state["momentum"])
    assert sync.fragments[1].syncs == 0  # the other lane was seeded, nothing to adopt


def test_an_exchange_in_flight_at_the_checkpoint_is_kept_when_the_group_closed_it() -> None:
    closed = SharedState(1, torch.full((6,), 2.0), {"momentum": torch.zeros(6)})
    sync, params = _sync([Lane(closed), Lane()])
    mean = torch.zeros(6)
    sync.in_flight[0] = InFlight(0, 3, mean, None, AverageResult(mean, 2, 0, 0))
    assert sync.seed_groups() is False  # the saved result brings the fragment there
    assert 0 in sync.in_flight and sync.fragments[0].syncs == 0
    assert torch.equal(params[0], torch.arange(6, dtype=torch.float32))
    # A group further ahead wins: the stale exchange is dropped.
    sync.fragments[0].transport = Lane(SharedState(2, torch.full((6,), 3.0), {}))
    assert sync.seed_groups() is True
    assert 0 not in sync.in_flight and sync.fragments[0].syncs == 2
