"""The regime advice (diloco/outer/advice.py): one line naming the key to change where the map
found DiLoCo far behind DDP, and None where it did not."""

from __future__ import annotations

import pytest

from diloco.outer.advice import (
    H1_MIN_LR_PER_SQRT_K,
    MIN_WARM_SHARE,
    SMALL_STEP_TOKENS,
    regime_warning,
)

DEMO = dict(tokens_per_step=1024, inner_steps=50, islands=4, rounds=8)


def test_the_demo_regime_is_warned_about_and_names_the_warm_phase() -> None:
    line = regime_warning(**DEMO)
    assert line is not None and "\n" not in line
    assert "outer.warmup_rounds to about 100" in line  # a quarter of 8 x 50 steps
    assert "data.batch_size 4x" in line and "docs/results/regime.md" in line
    assert "outer.warmup_lr between 1 and 2," in line  # sqrt(4)


def test_the_batch_factor_reaches_the_large_step_threshold() -> None:
    line = regime_warning(**{**DEMO, "tokens_per_step": 512, "islands": 2})
    assert line is not None and "data.batch_size 8x" in line
    assert "outer.warmup_lr between 1 and 1.4," in line


def test_large_steps_or_a_long_enough_warm_phase_are_not_warned_about() -> None:
    assert regime_warning(**{**DEMO, "tokens_per_step": SMALL_STEP_TOKENS}) is None
    # 100 warm rounds of one step, then 6 rounds of 50: a quarter of 400 steps.
    warm = {**DEMO, "rounds": 106, "warmup_rounds": 100}
    assert regime_warning(**warm) is None
    short = {**DEMO, "rounds": 106 - 1, "warmup_rounds": 99}
    assert MIN_WARM_SHARE > 99 / (99 + 6 * 50)
    assert regime_warning(**short) is not None


def test_one_island_has_no_ddp_to_trail() -> None:
    assert regime_warning(**{**DEMO, "islands": 1}) is None


@pytest.mark.parametrize(
    ("islands", "lr", "warned"), [(4, 1.0, True), (4, 2.0, False), (2, 1.0, True), (2, 1.4, False)]
)
def test_h1_without_momentum_wants_an_outer_lr_near_sqrt_k(
    islands: int, lr: float, warned: bool
) -> None:
    line = regime_warning(
        tokens_per_step=512, inner_steps=1, islands=islands, rounds=400, outer_lr=lr,
        outer_momentum=0.0,
    )  # fmt: skip
    assert (line is not None) == warned
    if line is not None:
        assert f"outer.lr to about {islands**0.5:.2g}" in line
        assert lr < H1_MIN_LR_PER_SQRT_K * islands**0.5


def test_h1_with_outer_momentum_is_warned_about_whatever_the_lr() -> None:
    line = regime_warning(tokens_per_step=128, inner_steps=1, islands=4, rounds=100)
    assert line is not None and "outer.momentum to 0" in line and "momentum 0.9" in line
