"""The island's layout and the `island` section: numbers and refusals, without processes
(diloco/parallel/{config,mesh}.py, issue 13). The process groups themselves are built in
tests/integration/test_island_parallel.py."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from diloco.errors import ConfigError
from diloco.parallel.config import IslandSection, Parallelism
from diloco.parallel.mesh import IslandLayout, resolve_mesh

DDP = Parallelism.ddp


def resolve(**overrides: Any) -> IslandLayout:
    settings: dict[str, Any] = {
        "world_size": 4,
        "world_rank": 0,
        "num_islands": 2,
        "islands_share_world": True,
        "configured_ranks": 0,
        "parallel": DDP,
        **overrides,
    }
    return resolve_mesh(**settings)


def test_section_defaults_and_names() -> None:
    """The names of island.parallel are part of the contract; the default is today's path."""
    assert [p.value for p in Parallelism] == ["none", "ddp", "fsdp"]
    section = IslandSection()
    assert section.parallel is Parallelism.none and section.ranks == 0


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"ranks": -1}, "island.ranks must be >= 0, got -1"),
        ({"ranks": 2}, "island.parallel must be ddp or fsdp with island.ranks=2, got none"),
    ],
)
def test_section_refusals(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        IslandSection(**settings)


def test_two_islands_of_two_ranks_in_one_world() -> None:
    """World ranks are island-major: rank r of island i is world rank i * R + r; the island
    groups are consecutive ranks and the shard groups stride by R."""
    layouts = [resolve(world_rank=w) for w in range(4)]
    assert [(x.island, x.island_rank) for x in layouts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {x.ranks_per_island for x in layouts} == {2}
    assert {(x.islands_in_world, x.num_islands) for x in layouts} == {(2, 2)}
    assert [layouts[0].island_world_ranks(i) for i in range(2)] == [[0, 1], [2, 3]]
    assert [layouts[0].shard_world_ranks(r) for r in range(2)] == [[0, 2], [1, 3]]


def test_each_island_its_own_world() -> None:
    """grpc / hivemind: the world is one island; its index is transport.rank."""
    layout = resolve(world_size=3, world_rank=2, islands_share_world=False, island=1)
    assert (layout.island, layout.island_rank, layout.ranks_per_island) == (1, 2, 3)
    assert layout.islands_in_world == 1 and layout.num_islands == 2
    assert layout.island_world_ranks(0) == [0, 1, 2]


def test_ranks_derived_or_configured() -> None:
    """island.ranks=0 takes what was launched; a matching value is accepted."""
    assert resolve(configured_ranks=2).ranks_per_island == 2
    assert resolve(world_size=2, parallel=Parallelism.none).ranks_per_island == 1
    plain = resolve(world_size=1, num_islands=1, parallel=Parallelism.none)
    assert (plain.island, plain.island_rank, plain.ranks_per_island) == (0, 0, 1)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"configured_ranks": 4},
            "island.ranks must match the 2 ranks per island launched "
            "(WORLD_SIZE=4 / transport.islands=2), got 4",
        ),
        (
            {"configured_ranks": 1, "islands_share_world": False},
            "island.ranks must match the 4 ranks per island launched (WORLD_SIZE=4), got 1",
        ),
        (
            {"parallel": Parallelism.none},
            "island.parallel must be ddp or fsdp with 2 ranks per island "
            "(WORLD_SIZE=4 / transport.islands=2), got none",
        ),
        (
            {"world_size": 5},
            "transport.islands must divide the WORLD_SIZE=5 processes launched "
            "(islands x island.ranks), got 2",
        ),
        (
            {"configured_ranks": 2, "hosts_every_island": True, "world_size": 1},
            "island.ranks must be 1 with a transport.kind that runs every island in one "
            "process (local), got 2",
        ),
    ],
)
def test_refusals_name_the_key(overrides: dict[str, Any], message: str) -> None:
    """Each mistake of the issue is one line naming the key, what was expected and got."""
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        resolve(**overrides)


def test_local_transport_keeps_one_rank_and_warns_about_parallel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every island in one process: one rank each; island.parallel is accepted with a warning
    that it has no effect, and the layout runs without parallelism."""
    with caplog.at_level(logging.WARNING, logger="diloco.parallel.mesh"):
        layout = resolve(world_size=1, hosts_every_island=True, configured_ranks=1)
    assert layout.ranks_per_island == 1 and layout.parallel is Parallelism.none
    assert "island.parallel=ddp has no effect" in caplog.text


def test_inconsistent_launch_inputs_are_our_bugs() -> None:
    with pytest.raises(ValueError, match="world rank 4 is outside a world of 4"):
        resolve(world_rank=4)
    with pytest.raises(ValueError, match="island 2 is outside a group of 2"):
        resolve(islands_share_world=False, island=2)
