"""outer.lr, outer.momentum and outer.nesterov left unset: the paper's step with several
islands, plain training with one (issue 15: one island with the paper's step trained 4.6 %
worse than plain AdamW, docs/results/regime.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diloco.config import IslandConfig
from diloco.config.load import load_config
from diloco.outer.config import OuterConfig
from diloco.transports.config import TransportConfig

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def step(config: IslandConfig) -> tuple[object, object, object]:
    return config.outer.lr, config.outer.momentum, config.outer.nesterov


def test_several_islands_get_the_papers_step() -> None:
    assert step(load_config(DEMO)) == (0.7, 0.9, True)
    assert step(load_config(None, ["transport.islands=2"])) == (0.7, 0.9, True)


def test_one_island_gets_plain_training() -> None:
    assert step(load_config(DEMO, ["transport.islands=1"])) == (1.0, 0.0, False)
    assert step(load_config(None)) == (1.0, 0.0, False)  # the schema's default: one island


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["outer.lr=0.7"], (0.7, 0.0, False)),
        (["outer.momentum=0.9", "outer.nesterov=true"], (1.0, 0.9, True)),
        (["outer.lr=0.5", "outer.momentum=0.5", "outer.nesterov=false"], (0.5, 0.5, False)),
    ],
)
def test_values_set_by_hand_are_kept(overrides: list[str], expected: tuple[object, ...]) -> None:
    assert step(load_config(DEMO, ["transport.islands=1", *overrides])) == expected


def test_one_island_with_adam_keeps_its_lr() -> None:
    """The one-island rule is measured for sgd only; adam keeps the several-islands lr."""
    config = load_config(DEMO, ["transport.islands=1", "outer.optimizer=adam"])
    assert config.outer.lr == 0.7
    assert config.outer.ignored_options() == {}  # unset keys are never reported as ignored


def test_an_outer_config_alone_reads_as_the_papers_step() -> None:
    outer = OuterConfig()
    assert (outer.lr, outer.step_lr, outer.step_momentum, outer.step_nesterov) == (
        None,
        0.7,
        0.9,
        True,
    )


def test_one_outer_config_follows_the_island_count_it_is_given() -> None:
    outer = OuterConfig()
    IslandConfig(outer=outer, transport=TransportConfig(islands=1))
    assert (outer.lr, outer.momentum, outer.nesterov) == (1.0, 0.0, False)
    IslandConfig(outer=outer, transport=TransportConfig(islands=3))
    assert (outer.lr, outer.momentum, outer.nesterov) == (0.7, 0.9, True)


def test_an_impossible_momentum_is_still_refused() -> None:
    from diloco.errors import ConfigError

    with pytest.raises(ConfigError, match="outer.momentum"):
        load_config(None, ["outer.momentum=1.0"])
