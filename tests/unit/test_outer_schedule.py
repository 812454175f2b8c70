"""The outer loop over time (diloco/outer/schedule.py) and the optimizers that follow it."""

from __future__ import annotations

import math

import pytest
import torch

from diloco.config import load_config
from diloco.errors import ConfigError
from diloco.outer.nesterov import nesterov_step_
from diloco.outer.optimizers import SgdOuter, TorchOuter, adam_outer
from diloco.outer.schedule import OuterSchedule


def schedule(**overrides: object) -> OuterSchedule:
    settings: dict[str, object] = dict(rounds=10, inner_steps=5, lr=0.7, momentum=0.9)
    settings.update(overrides)
    return OuterSchedule(**settings)  # type: ignore[arg-type]


def test_the_default_schedule_is_constant() -> None:
    plain = schedule()
    assert [plain.steps_in_round(r) for r in range(10)] == [5] * 10
    assert plain.total_steps() == 50 and plain.steps_before(4) == 20
    assert {plain.lr_at(r) for r in range(10)} == {0.7}
    assert {plain.momentum_at(r) for r in range(10)} == {0.9}


def test_the_warm_phase_has_one_step_per_round_at_its_own_lr() -> None:
    warm = schedule(warmup_rounds=3, warmup_lr=2.0)
    assert [warm.steps_in_round(r) for r in range(5)] == [1, 1, 1, 5, 5]
    assert warm.total_steps() == 3 + 7 * 5
    assert warm.steps_before(3) == 3 and warm.steps_before(5) == 13
    assert [warm.lr_at(r) for r in (0, 2, 3)] == [2.0, 2.0, 0.7]
    assert [warm.momentum_at(r) for r in (0, 2, 3)] == [0.0, 0.0, 0.9]


def test_momentum_ramps_up_after_the_warm_phase() -> None:
    ramp = schedule(warmup_rounds=2, momentum_warmup_rounds=4)
    got = [ramp.momentum_at(r) for r in range(2, 8)]
    assert got == pytest.approx([0.0, 0.225, 0.45, 0.675, 0.9, 0.9])


def test_cosine_goes_from_lr_to_the_floor_over_the_main_rounds() -> None:
    cosine = schedule(lr_schedule="cosine", min_lr_ratio=0.1, warmup_rounds=2)
    assert cosine.lr_at(2) == pytest.approx(0.7)
    assert cosine.lr_at(9) == pytest.approx(0.07)
    middle = cosine.lr_at(2 + 7 // 2)
    assert 0.07 < middle < 0.7
    values = [cosine.lr_at(r) for r in range(2, 10)]
    assert values == sorted(values, reverse=True)
    assert math.isclose(cosine.lr_at(1), 1.0)  # still warm: the warm lr


def test_sgd_with_the_default_schedule_is_the_plain_nesterov_step() -> None:
    """Bit for bit: the schedule changes nothing unless asked to."""
    generator = torch.Generator().manual_seed(0)
    scheduled = SgdOuter(lr=0.7, momentum=0.9, nesterov=True, schedule=schedule())
    anchor, expected = torch.randn(100, generator=generator), None
    expected = anchor.clone()
    state = scheduled.init_state(anchor)
    momentum = torch.zeros(100)
    for round in range(5):
        mean = torch.randn(100, generator=generator)
        scheduled.step_(anchor, mean, state, round)
        nesterov_step_(expected, mean, momentum, lr=0.7, mu=0.9)
    assert torch.equal(anchor, expected) and torch.equal(state["momentum"], momentum)


def test_a_warm_round_is_plain_sgd_and_leaves_the_momentum_alone() -> None:
    warm = SgdOuter(
        lr=0.7, momentum=0.9, nesterov=True, schedule=schedule(warmup_rounds=2, warmup_lr=2.0)
    )
    anchor, mean = torch.ones(4), torch.full((4,), 0.25)
    state = warm.init_state(anchor)
    warm.step_(anchor, mean, state, 0)
    assert torch.equal(anchor, torch.full((4,), 0.5)) and torch.equal(
        state["momentum"], torch.zeros(4)
    )
    warm.step_(anchor, mean, state, 2)  # the first main round: momentum 0.9, lr 0.7
    assert torch.equal(state["momentum"], mean)


def test_adam_in_the_warm_phase_keeps_its_state_empty() -> None:
    adam = adam_outer(lr=0.1, betas=(0.9, 0.99), eps=1e-8, schedule=schedule(warmup_rounds=1))
    anchor, state = torch.zeros(3), {}
    adam.step_(anchor, torch.ones(3), state, 0)
    assert state == {} and torch.equal(anchor, -torch.ones(3))
    adam.step_(anchor, torch.ones(3), state, 1)
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}


def test_a_cosine_schedule_scales_a_torch_optimizers_own_lr() -> None:
    def sgd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=0.5)

    cosine = schedule(lr=0.7, lr_schedule="cosine", min_lr_ratio=0.0, rounds=3)
    scheduled = TorchOuter(sgd, name="test", schedule=cosine)
    for round, factor in ((0, 1.0), (2, 0.0)):
        anchor = torch.zeros(2)
        scheduled.step_(anchor, torch.ones(2), {}, round)
        assert torch.allclose(anchor, torch.full((2,), -0.5 * factor))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("outer.warmup_rounds=10", "outer.warmup_rounds must be in [0, outer.rounds=10)"),
        ("outer.warmup_lr=0", "outer.warmup_lr must be > 0"),
        ("outer.momentum_warmup_rounds=-1", "outer.momentum_warmup_rounds must be >= 0"),
        ("outer.min_lr_ratio=2", "outer.min_lr_ratio must be in [0, 1]"),
        ("outer.lr_schedule=linear", "outer.lr_schedule"),
    ],
)
def test_bad_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(None, ["outer.rounds=10", override])


def test_settings_that_have_no_effect_are_named_with_what_would_read_them() -> None:
    config = load_config(None, ["outer.warmup_lr=2", "outer.min_lr_ratio=0.5"])
    ignored = config.ignored_options()
    assert ignored["outer.warmup_lr"] == "read only with outer.warmup_rounds > 0"
    assert ignored["outer.min_lr_ratio"] == (
        "read only with an outer.lr_schedule other than constant"
    )
    adam = load_config(None, ["outer.optimizer=adam", "outer.momentum_warmup_rounds=3"])
    assert adam.ignored_options() == {
        "outer.momentum_warmup_rounds": "not read by outer.optimizer=adam"
    }


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["outer.eager=true"], {"outer.eager": "read only with outer.overlap_steps > 0"}),
        (["outer.eager=true", "outer.overlap_steps=5"], {}),
        (["outer.block_size=64"], {
            "outer.block_size": "read only by outer.codec=int8|fp8|fp4|fp4_e2m1|fp4_e3m0|topk"
        }),
        (["outer.codec=int8", "outer.block_size=64"], {}),
        (["outer.error_feedback_decay=0.5"], {
            "outer.error_feedback_decay": "read only with outer.error_feedback=true"
        }),
        (["transport.trim_fraction=0.3"], {
            "transport.trim_fraction": "read only by transport.kind=grpc"
        }),
        (["transport.kind=grpc", "transport.trim_fraction=0.3"], {
            "transport.trim_fraction": "read only with transport.aggregate=trimmed_mean"
        }),
        (["model.name=mymodel:build", "model.d_model=64"], {
            "model.d_model": "read only by model.name=gpt"
        }),
        (["data.selector.ratio=0.25"], {
            "data.selector.ratio": "read only by data.selector.name=jest"
        }),
    ],
)  # fmt: skip
def test_each_ignored_key_says_what_would_read_it(
    overrides: list[str], expected: dict[str, str]
) -> None:
    assert load_config(None, overrides).ignored_options() == expected
