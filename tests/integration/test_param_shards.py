"""ParamShard: how an island of several ranks splits its flat parameters for the outer sync, and
puts the new anchor back (diloco/outer/shards.py), on 2 gloo ranks."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import torch
import torch.distributed as dist
from harness import connect_store, spawn_children, tcp_store

from diloco.outer.pseudo_gradient import flatten_params
from diloco.outer.shards import SlicedParams, WholeParams, shard_bounds
from diloco.shared_state import params_sha256

pytestmark = pytest.mark.timeout(90)


def test_shard_bounds_cover_the_vector_in_order() -> None:
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert shard_bounds(7, 1) == [(0, 7)]


def test_one_rank_is_every_parameter() -> None:
    params = [torch.arange(6.0).reshape(2, 3), torch.tensor([7.0])]
    whole = WholeParams(params)
    assert torch.equal(whole.read(), torch.tensor([0.0, 1, 2, 3, 4, 5, 7]))
    whole.write_(torch.zeros(7))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)
    assert whole.island_sha256("abc") == "abc"


def _ddp_rank(port: int, rank: int) -> dict[str, object]:
    dist.init_process_group(
        "gloo",
        store=connect_store(port),
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        params = [torch.arange(5.0), torch.arange(5.0, 8.0).reshape(3, 1)]  # 8 elements
        sliced = SlicedParams(params, rank=rank, ranks=2, group=dist.group.WORLD)
        shard = sliced.read()
        # Each rank moves its own shard: the island's parameters must end with both moves.
        sliced.write_(shard + 100.0 * (rank + 1))
        digest = params_sha256(shard)
        return {
            "shard": shard.tolist(),
            "after": flatten_params(params).tolist(),
            "island": sliced.island_sha256(digest),
            "digests": [params_sha256(torch.arange(4.0)), params_sha256(torch.arange(4.0, 8.0))],
        }
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_sync_a_slice_each_and_all_gather_the_anchor() -> None:
    store = tcp_store()
    first, second = spawn_children(_ddp_rank, [(store.port, 0), (store.port, 1)], timeout_s=80)
    assert first["shard"] == [0.0, 1.0, 2.0, 3.0] and second["shard"] == [4.0, 5.0, 6.0, 7.0]
    expected = [100.0, 101.0, 102.0, 103.0, 204.0, 205.0, 206.0, 207.0]
    assert first["after"] == expected and second["after"] == expected
    digests = first["digests"]
    assert isinstance(digests, list)
    assert (
        first["island"] == second["island"] == hashlib.sha256("".join(digests).encode()).hexdigest()
    )
