"""The coordinator's aggregates: weighted mean, coordinate median, trimmed mean, norm clipping."""

from __future__ import annotations

import pytest
import torch

from diloco.aggregate import (
    clip_to_norm,
    coordinate_median,
    trimmed_mean,
    weighted_mean,
)

pytestmark = pytest.mark.timeout(10)


def test_weighted_mean_matches_hand_computation() -> None:
    deltas = [torch.tensor([1.0, -2.0, 0.3]), torch.tensor([4.0, 2.0, 0.6])]
    weights = [1.0, 2.0]
    mean = weighted_mean(deltas, weights)
    # (1 * d0 + 2 * d1) / 3
    expected = torch.tensor([(1 + 8) / 3, (-2 + 4) / 3, (0.3 + 1.2) / 3])
    assert mean.dtype == torch.float32
    assert float((mean - expected).abs().max()) <= 1e-6 * float(expected.abs().max())


def test_weighted_mean_is_exact_on_dyadic_values() -> None:
    # Weights 1 and 3 of 4 give alphas 0.25 and 0.75: every product and sum is exact in fp32.
    deltas = [torch.tensor([1.0, 2.0, -0.5, 8.0]), torch.tensor([3.0, 4.0, 0.25, -8.0])]
    mean = weighted_mean(deltas, [1.0, 3.0])
    assert torch.equal(mean, torch.tensor([2.5, 3.5, 0.0625, -4.0]))


def test_weighted_mean_of_low_precision_inputs_is_fp32() -> None:
    deltas = [torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([3.0, 4.0])]
    mean = weighted_mean(deltas, [1.0, 1.0])
    assert mean.dtype == torch.float32
    assert torch.equal(mean, torch.tensor([2.0, 3.0]))


def test_weighted_mean_does_not_modify_its_inputs() -> None:
    first = torch.tensor([1.0, 2.0])
    weighted_mean([first, torch.tensor([5.0, 6.0])], [1.0, 1.0])
    assert torch.equal(first, torch.tensor([1.0, 2.0]))


def test_weighted_mean_refuses_nothing_to_average() -> None:
    with pytest.raises(ValueError, match="nothing to average"):
        weighted_mean([], [])


def test_weighted_mean_refuses_mismatched_weights() -> None:
    with pytest.raises(ValueError, match="need one weight per vector, got 2 and 3"):
        weighted_mean([torch.ones(2), torch.ones(2)], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0]])
def test_weighted_mean_refuses_weights_that_sum_to_zero(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weights must sum to > 0"):
        weighted_mean([torch.ones(2), torch.ones(2)], weights)


def test_coordinate_median_odd_count() -> None:
    deltas = [
        torch.tensor([1.0, 30.0, -1.0]),
        torch.tensor([5.0, 10.0, -3.0]),
        torch.tensor([3.0, 20.0, 100.0]),
    ]
    assert torch.equal(coordinate_median(deltas), torch.tensor([3.0, 20.0, -1.0]))


def test_coordinate_median_even_count_averages_the_two_middle_values() -> None:
    deltas = [
        torch.tensor([1.0, 0.0]),
        torch.tensor([20.0, -4.0]),
        torch.tensor([2.0, 8.0]),
        torch.tensor([10.0, 2.0]),
    ]
    # Per coordinate: sorted (1, 2, 10, 20) -> 6; sorted (-4, 0, 2, 8) -> 1.
    assert torch.equal(coordinate_median(deltas), torch.tensor([6.0, 1.0]))


def test_coordinate_median_ignores_one_outlier_island() -> None:
    honest = [torch.full((4,), float(v)) for v in (1, 2, 3)]
    with_outlier = [*honest, torch.full((4,), 1e9)]
    assert torch.equal(coordinate_median(with_outlier), torch.full((4,), 2.5))


def test_trimmed_mean_drops_the_extremes_per_coordinate() -> None:
    deltas = [
        torch.tensor([1.0, 50.0]),
        torch.tensor([2.0, 40.0]),
        torch.tensor([3.0, 30.0]),
        torch.tensor([4.0, 20.0]),
        torch.tensor([100.0, -1000.0]),
    ]
    # trim 0.2 of 5: one smallest and one largest dropped in each coordinate.
    # coord 0 keeps 2, 3, 4 -> 3; coord 1 keeps 20, 30, 40 -> 30.
    assert torch.equal(trimmed_mean(deltas, 0.2), torch.tensor([3.0, 30.0]))


def test_trimmed_mean_is_not_moved_by_an_outlier_island() -> None:
    generator = torch.Generator().manual_seed(0)
    honest = [torch.randn(64, generator=generator) for _ in range(4)]
    small = trimmed_mean([*honest, torch.full((64,), 1e3)], 0.2)
    huge = trimmed_mean([*honest, torch.full((64,), 1e30)], 0.2)
    assert torch.equal(small, huge)
    assert float(small.abs().max()) < 10.0


def test_trimmed_mean_at_trim_zero_is_the_mean() -> None:
    generator = torch.Generator().manual_seed(1)
    deltas = [torch.randn(32, generator=generator) for _ in range(5)]
    expected = weighted_mean(deltas, [1.0] * 5)
    assert float((trimmed_mean(deltas, 0.0) - expected).abs().max()) <= 1e-6


def test_trimmed_mean_with_too_few_islands_to_trim_is_the_mean() -> None:
    # floor(0.2 * 4) = 0: nothing is dropped, so the outlier counts.
    deltas = [torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([8.0])]
    assert torch.equal(trimmed_mean(deltas, 0.2), torch.tensor([2.0]))


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7])
def test_trimmed_mean_refuses_a_fraction_outside_the_range(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0.5\)"):
        trimmed_mean([torch.ones(2)] * 3, fraction)


def test_clip_to_norm_scales_to_exactly_max_norm() -> None:
    clipped = clip_to_norm(torch.tensor([6.0, 8.0]), 5.0)  # norm 10 -> scale 0.5, exact
    assert torch.equal(clipped, torch.tensor([3.0, 4.0]))


def test_clip_to_norm_of_a_long_random_vector_has_max_norm() -> None:
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 10
    clipped = clip_to_norm(delta, 1.5)
    assert float(torch.linalg.vector_norm(clipped)) == pytest.approx(1.5, rel=1e-6)
    # Same direction: a positive multiple of the input.
    ratio = clipped / delta
    assert float(ratio[0]) > 0
    assert float((ratio - ratio[0]).abs().max()) <= 1e-6 * float(ratio[0])


def test_clip_to_norm_leaves_short_vectors_unchanged() -> None:
    delta = torch.tensor([0.3, -0.4])  # norm 0.5
    assert torch.equal(clip_to_norm(delta, 1.0), delta)
    assert torch.equal(clip_to_norm(delta, 0.5 + 1e-6), delta)


def test_clip_to_norm_zero_disables_clipping() -> None:
    delta = torch.tensor([600.0, 800.0])
    assert torch.equal(clip_to_norm(delta, 0.0), delta)
