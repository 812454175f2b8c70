"""The one-rank path of diloco/parallel: no process group, the model as it is, and the
helpers the outer sync and the trainer use (DDP and FSDP2 themselves run in
tests/integration/test_island_parallel.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from diloco.models import GPT, GPTConfig
from diloco.outer.pseudo_gradient import copy_flat_into_, flatten_params
from diloco.parallel.config import Parallelism
from diloco.parallel.mesh import IslandLayout, build_mesh, resolve_mesh
from diloco.parallel.wrap import (
    gradient_sync_paused,
    local_parameters,
    sharded_blocks,
    unwrap,
    wrap_model,
)

CPU = torch.device("cpu")


def one_rank(parallel: Parallelism = Parallelism.none) -> IslandLayout:
    return resolve_mesh(
        world_size=1,
        world_rank=0,
        num_islands=2,
        islands_share_world=False,
        configured_ranks=0,
        parallel=parallel,
        island=1,
    )


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=3, n_head=1, d_model=8, vocab_size=16, context=4))


def test_one_rank_island_makes_no_group_and_keeps_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """island.parallel=none: no process group, even without torch.distributed; wrap_model
    returns the very module; its local parameters are its parameters, sharing storage."""
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    mesh = build_mesh(one_rank(), CPU)
    assert mesh.island_group is None and mesh.shard_group is None
    model = tiny_gpt()
    assert wrap_model(model, mesh, CPU) is model and unwrap(model) is model
    local = local_parameters(model)
    params = list(model.parameters())
    assert [t.shape for t in local] == [p.shape for p in params]
    copy_flat_into_(local, flatten_params(local) * 0 + 3)
    assert all(bool((p == 3).all()) for p in params)


def test_parallel_island_needs_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ddp or fsdp island builds groups: without an initialized world it says so."""
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="island.parallel=fsdp needs torch.distributed"):
        build_mesh(one_rank(Parallelism.fsdp), CPU)


def test_sharded_blocks_are_the_outermost_module_lists() -> None:
    """The GPT's blocks, in order; a list nested in a block is not a unit of its own; a model
    without a ModuleList has no block (its root is the one unit)."""
    model = tiny_gpt()
    assert sharded_blocks(model) == list(model.blocks)

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(
                [nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2)]))]
            )
            self.head = nn.ModuleList([nn.Linear(2, 1)])

    nested = Nested()
    assert sharded_blocks(nested) == [nested.layers[0], nested.head[0]]
    assert sharded_blocks(nn.Linear(2, 2)) == []


def test_plain_module_pauses_nothing() -> None:
    """Without DDP or FSDP2, gradient_sync_paused is a no-op context: gradients accumulate."""
    model = nn.Linear(2, 1)
    with gradient_sync_paused(model):
        model(torch.ones(1, 2)).sum().backward()
    model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is not None
    assert torch.equal(model.weight.grad, torch.full((1, 2), 2.0))


class SyncRecorder(nn.Linear):
    """Stands for an FSDPModule: records set_requires_gradient_sync calls."""

    def __init__(self) -> None:
        super().__init__(2, 1)
        self.calls: list[bool] = []

    def set_requires_gradient_sync(self, requires: bool) -> None:
        self.calls.append(requires)


class Compiled(nn.Module):
    """Stands for torch.compile's wrapper: the module it holds is `_orig_mod`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_fsdp_sync_is_paused_then_restored_through_a_compile_wrapper() -> None:
    """gradient_sync_paused looks through run.compile's wrapper, turns FSDP2's gradient sync
    off for the block and back on after it, even when the block raises."""
    inner = SyncRecorder()
    with gradient_sync_paused(Compiled(inner)):
        assert inner.calls == [False]
    assert inner.calls == [False, True]
    with pytest.raises(RuntimeError, match="boom"), gradient_sync_paused(inner):
        raise RuntimeError("boom")
    assert inner.calls == [False, True, False, True]
    assert unwrap(Compiled(inner)) is inner
