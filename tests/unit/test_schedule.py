"""The inner learning rate: linear warm-up, then cosine decay to lr * min_lr_ratio."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest

from diloco.inner import warmup_cosine_lr

PEAK, WARMUP, TOTAL, RATIO = 4e-4, 10, 110, 0.1


def lr(step: int, *, warmup: int = WARMUP, total: int = TOTAL, ratio: float = RATIO) -> float:
    return warmup_cosine_lr(
        step, peak_lr=PEAK, warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio
    )


def test_warmup_is_linear_from_the_first_step() -> None:
    """Step s < warmup gets peak * (s + 1) / warmup: never 0, so step 0 trains."""
    for step in range(WARMUP):
        assert lr(step) == pytest.approx(PEAK * (step + 1) / WARMUP, rel=1e-12)
    differences = [lr(s + 1) - lr(s) for s in range(WARMUP - 1)]
    assert differences == pytest.approx([PEAK / WARMUP] * (WARMUP - 1), rel=1e-9)


def test_peak_at_the_end_of_warmup() -> None:
    """The last warm-up step and the first decay step both run at the peak."""
    assert lr(WARMUP - 1) == pytest.approx(PEAK, rel=1e-12)
    assert lr(WARMUP) == pytest.approx(PEAK, rel=1e-12)
    assert max(lr(s) for s in range(TOTAL + 5)) == pytest.approx(PEAK, rel=1e-12)


def test_cosine_midpoint_and_end_value() -> None:
    """Half-way through the decay the lr is half-way to the floor; it ends at peak * ratio
    after total_steps and stays there."""
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert lr(middle) == pytest.approx(PEAK * (RATIO + (1 - RATIO) * 0.5), rel=1e-12)
    assert lr(TOTAL) == pytest.approx(PEAK * RATIO, rel=1e-12)
    assert lr(TOTAL + 1000) == pytest.approx(PEAK * RATIO, rel=1e-12)
    quarter = WARMUP + (TOTAL - WARMUP) // 4
    cosine = 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr(quarter) == pytest.approx(PEAK * (RATIO + (1 - RATIO) * cosine), rel=1e-12)


def test_decay_is_monotone() -> None:
    """From the peak to the end the lr never rises."""
    values = [lr(s) for s in range(WARMUP, TOTAL + 3)]
    assert all(later <= earlier for earlier, later in pairwise(values))
    assert values[0] > values[-1]


def test_no_warmup_starts_at_the_peak() -> None:
    """warmup_steps 0: step 0 is already at the peak, then the cosine runs over total_steps."""
    assert lr(0, warmup=0) == pytest.approx(PEAK, rel=1e-12)
    assert lr(50, warmup=0, total=100) == pytest.approx(PEAK * (RATIO + (1 - RATIO) / 2))
    assert lr(100, warmup=0, total=100) == pytest.approx(PEAK * RATIO, rel=1e-12)


def test_ratio_one_is_constant_after_warmup() -> None:
    """min_lr_ratio 1: no decay at all."""
    values = [lr(s, ratio=1.0) for s in range(WARMUP - 1, TOTAL + 2)]
    assert values == pytest.approx([PEAK] * len(values), rel=1e-12)


def test_warmup_as_long_as_the_run() -> None:
    """warmup_steps == total_steps: warm-up to the peak, then at the floor (no division by 0)."""
    assert lr(TOTAL - 1, warmup=TOTAL) == pytest.approx(PEAK, rel=1e-12)
    assert lr(TOTAL, warmup=TOTAL) == pytest.approx(PEAK, rel=1e-12)
    assert lr(TOTAL + 1, warmup=TOTAL) == pytest.approx(PEAK * RATIO, rel=1e-12)
