"""AdaptiveDeadline: slack times the latest arrival of recent rounds, within [floor, ceiling]."""

from __future__ import annotations

import pytest

from diloco.transports.grpc.deadline import AdaptiveDeadline

pytestmark = pytest.mark.timeout(10)


def test_floor_before_any_observation() -> None:
    assert AdaptiveDeadline(floor_s=3.0, ceiling_s=60.0, slack=2.0).seconds() == 3.0


def test_an_empty_round_is_not_an_observation() -> None:
    deadline = AdaptiveDeadline(floor_s=3.0, ceiling_s=60.0, slack=2.0)
    deadline.observe_round([])
    assert deadline.seconds() == 3.0


def test_slack_times_the_latest_arrival() -> None:
    deadline = AdaptiveDeadline(floor_s=1.0, ceiling_s=60.0, slack=2.5)
    deadline.observe_round([0.0, 4.0, 2.0])
    assert deadline.seconds() == 10.0


def test_never_below_the_floor() -> None:
    deadline = AdaptiveDeadline(floor_s=5.0, ceiling_s=60.0, slack=2.0)
    deadline.observe_round([0.0, 1.0])
    assert deadline.seconds() == 5.0


def test_clamped_to_the_ceiling() -> None:
    deadline = AdaptiveDeadline(floor_s=1.0, ceiling_s=30.0, slack=2.0)
    deadline.observe_round([0.0, 20.0])
    assert deadline.seconds() == 30.0


def test_the_latest_of_recent_rounds_counts() -> None:
    deadline = AdaptiveDeadline(floor_s=1.0, ceiling_s=100.0, slack=2.0)
    deadline.observe_round([0.0, 9.0])
    deadline.observe_round([0.0, 2.0])
    assert deadline.seconds() == 18.0


def test_late_arrivals_raise_it() -> None:
    deadline = AdaptiveDeadline(floor_s=1.0, ceiling_s=100.0, slack=2.0)
    deadline.observe_round([0.0, 3.0])
    assert deadline.seconds() == 6.0
    deadline.observe_late(7.0)
    assert deadline.seconds() == 14.0
    deadline.observe_late(4.0)  # earlier than what the round already holds: no change
    assert deadline.seconds() == 14.0


def test_a_late_arrival_before_any_round_counts() -> None:
    deadline = AdaptiveDeadline(floor_s=1.0, ceiling_s=100.0, slack=2.0)
    deadline.observe_late(6.0)
    assert deadline.seconds() == 12.0


def test_the_window_forgets_old_rounds() -> None:
    deadline = AdaptiveDeadline(floor_s=1.0, ceiling_s=100.0, slack=2.0, window=3)
    deadline.observe_round([40.0])
    for _ in range(2):
        deadline.observe_round([2.0])
        assert deadline.seconds() == 80.0  # the slow round is still in the window
    deadline.observe_round([2.0])
    assert deadline.seconds() == 4.0


@pytest.mark.parametrize(("floor_s", "ceiling_s"), [(0.0, 10.0), (-1.0, 10.0), (20.0, 10.0)])
def test_refuses_a_bad_range(floor_s: float, ceiling_s: float) -> None:
    with pytest.raises(ValueError, match="need 0 < floor_s <= ceiling_s"):
        AdaptiveDeadline(floor_s=floor_s, ceiling_s=ceiling_s, slack=2.0)
