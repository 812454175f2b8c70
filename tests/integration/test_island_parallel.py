"""An island of several ranks trains like one rank with the whole island batch (issue 13).

Spawned gloo processes on a TCPStore this test owns run the library pieces an island of R
ranks is made of: `resolve_mesh` + `build_mesh` (the groups), `wrap_model` (DDP or FSDP2 over
the island group), `rank_micro_batches` (rank r's block of the island batch) and
`InnerTrainer.train_step` (gradient accumulation, sync on the last micro-batch). The
reference is one process with one rank and the whole island batch, computed here.

"Relative" is ||x - reference|| / ||reference|| over the flattened tensors. The AdamW first
moments are compared as well as the parameters: AdamW's update is nearly invariant to the
gradient's scale, the moments are not (a sum instead of a mean over ranks shows there).
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import connect_store, spawn_children, tcp_store
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from diloco.inner import InnerTrainer
from diloco.inner.config import InnerConfig
from diloco.models import GPT, GPTConfig
from diloco.outer.pseudo_gradient import copy_flat_into_, flatten_params
from diloco.parallel import (
    IslandMesh,
    Parallelism,
    build_mesh,
    gradient_sync_paused,
    local_parameters,
    rank_micro_batches,
    resolve_mesh,
    unwrap,
    wrap_model,
)
from diloco.parallel.stitch import stitch_island_anchor

CPU = torch.device("cpu")
B = 2  # data.batch_size: rows per rank and per micro-batch
STEPS = 3
# vocab 61: the tied embedding's rows do not split evenly over 2 ranks (FSDP2 pads the last).
GPT_CONFIG = GPTConfig(n_layer=2, n_head=2, d_model=32, vocab_size=61, context=16)
INNER = {"lr": 1e-2, "warmup_steps": 1, "min_lr_ratio": 0.1, "grad_clip": 0.0}
# (parallelism, grad_accum, grad_clip): clip 0 keeps the moments scale-sensitive; the small
# clip makes every step clip (FSDP2: the norm of DTensor gradients across the island).
RUNS = [("ddp", 1, 0.0), ("ddp", 2, 0.0), ("fsdp", 1, 0.0), ("fsdp", 2, 0.0), ("fsdp", 1, 0.02)]
TIMEOUT = datetime.timedelta(seconds=60)


def island_batch(step: int, rows: int) -> torch.Tensor:
    """Step `step`'s island batch: the same rows on every rank and in the reference."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, GPT_CONFIG.vocab_size, (rows, 17), generator=generator)


def new_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPT_CONFIG)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective over its mesh); a plain tensor as it is."""
    gather = getattr(tensor, "full_tensor", None)
    return (tensor if gather is None else gather()).detach().reshape(-1).clone()


def train(model: torch.nn.Module, r: int, ranks: int, grad_accum: int, clip: float) -> dict:  # type: ignore[type-arg]
    """STEPS inner steps of rank r's share; the whole parameters, moments and losses."""
    config = InnerConfig(**{**INNER, "grad_clip": clip}, grad_accum=grad_accum)  # type: ignore[arg-type]
    trainer = InnerTrainer(model, config, total_steps=STEPS, device=CPU)
    losses = []
    for step in range(STEPS):
        tokens = island_batch(step, B * ranks * grad_accum)
        micro = rank_micro_batches(tokens, island_rank=r, ranks=ranks, grad_accum=grad_accum)
        losses.append(trainer.train_step(*micro).item())
    params = list(unwrap(model).parameters())
    return {
        "params": torch.cat([full(p) for p in params]).tolist(),
        "moments": torch.cat(
            [full(trainer.optimizer.state[p]["exp_avg"]) for p in params]
        ).tolist(),
        "losses": losses,
    }


def _island_rank(port: int, world_rank: int, world_size: int) -> dict[str, Any]:
    """One rank of a one-island world: every run of RUNS, and FSDP2's local parameters."""
    dist.init_process_group(
        "gloo", store=connect_store(port), rank=world_rank, world_size=world_size, timeout=TIMEOUT
    )
    try:
        meshes = {}
        for parallel in (Parallelism.ddp, Parallelism.fsdp):
            layout = resolve_mesh(
                world_size=world_size,
                world_rank=world_rank,
                num_islands=1,
                islands_share_world=False,
                configured_ranks=0,
                parallel=parallel,
            )
            meshes[parallel.value] = build_mesh(layout, CPU)
        r, ranks = layout.island_rank, layout.ranks_per_island
        results: dict[str, Any] = {
            f"{name}-{grad_accum}-{clip}": train(
                wrap_model(new_model(), meshes[name], CPU), r, ranks, grad_accum, clip
            )
            for name, grad_accum, clip in RUNS
        }
        fsdp = meshes["fsdp"]
        results["shards"] = local_shards(wrap_model(new_model(), fsdp, CPU))
        results["fsdp_paused"] = fsdp_sync_paused(wrap_model(new_model(), fsdp, CPU))
        results["ddp_all_reduces"] = [ddp_all_reduces(meshes["ddp"], a) for a in (1, 2)]
        return results
    finally:
        dist.destroy_process_group()


def ddp_all_reduces(mesh: IslandMesh, grad_accum: int) -> int:
    """Gradient buckets DDP all-reduces in one inner step of `grad_accum` micro-batches."""
    model = wrap_model(new_model(), mesh, CPU)
    calls = []

    # Unannotated: DDP checks a hook's annotations against the classes, and this module's
    # annotations are strings (`from __future__ import annotations`).
    def counting_hook(group, bucket):  # type: ignore[no-untyped-def]
        calls.append(bucket.index())
        return allreduce_hook(group, bucket)

    assert isinstance(model, DistributedDataParallel)
    model.register_comm_hook(mesh.island_group, counting_hook)
    config = InnerConfig(**INNER, grad_accum=grad_accum)  # type: ignore[arg-type]
    trainer = InnerTrainer(model, config, total_steps=1, device=CPU)
    micro = rank_micro_batches(
        island_batch(0, B * 2 * grad_accum),
        island_rank=dist.get_rank(),
        ranks=2,
        grad_accum=grad_accum,
    )
    trainer.train_step(*micro)
    return len(calls)


def fsdp_sync_paused(model: torch.nn.Module) -> list[bool]:
    """Whether the sharded gradients exist after a backward inside gradient_sync_paused (no:
    FSDP2 keeps the unsharded gradient and reduce-scatters nothing), then after one outside."""
    with gradient_sync_paused(model):
        model(island_batch(0, B)).backward()
    paused = any(p.grad is not None for p in model.parameters())
    model(island_batch(1, B)).backward()
    synced = all(p.grad is not None for p in model.parameters())
    return [paused, synced]


def local_shards(model: torch.nn.Module) -> dict[str, Any]:
    """Taken before the first forward and written after a step: FSDP2's local shards share
    storage with the model (a +1 written into them shows in the gathered parameters)."""
    shards = local_parameters(model)
    numels = [s.numel() for s in shards]
    flat = flatten_params(shards).tolist()
    before = torch.cat([full(p) for p in model.parameters()])
    model(island_batch(0, B)).backward()  # FSDP2's lazy init, then its gathers and frees
    copy_flat_into_(shards, flatten_params(shards) + 1)
    after = torch.cat([full(p) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return {"numels": numels, "shift": (after - before).tolist(), "flat": flat,
            "before": before.tolist()}  # fmt: skip


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    """Both ranks' results of every run of one island of 2 gloo ranks."""
    store = tcp_store()
    return spawn_children(_island_rank, [(store.port, r, 2) for r in range(2)], timeout_s=240)


def one_rank(grad_accum: int, clip: float, ranks: int = 2) -> dict:  # type: ignore[type-arg]
    """The reference: one rank, grad_accum=1, the island's whole batch of B x R x A rows."""
    torch.set_num_threads(1)
    config = InnerConfig(**{**INNER, "grad_clip": clip})  # type: ignore[arg-type]
    model = new_model()
    trainer = InnerTrainer(model, config, total_steps=STEPS, device=CPU)
    losses = [
        trainer.train_step(island_batch(s, B * ranks * grad_accum)).item() for s in range(STEPS)
    ]
    params = list(model.parameters())
    return {
        "params": torch.cat([full(p) for p in params]).tolist(),
        "moments": torch.cat(
            [full(trainer.optimizer.state[p]["exp_avg"]) for p in params]
        ).tolist(),
        "losses": losses,
    }


def relative(got: list[float], expected: list[float]) -> float:
    a, b = torch.tensor(got), torch.tensor(expected)
    return float((a - b).norm() / b.norm())


def assert_close_runs(got: dict, expected: dict, tolerance: float) -> None:  # type: ignore[type-arg]
    assert relative(got["params"], expected["params"]) < tolerance
    assert relative(got["moments"], expected["moments"]) < tolerance


def test_fsdp_shards_stitch_into_the_island_vector(two_ranks: list[dict[str, Any]]) -> None:
    """What an export of a multi-rank island does with its ranks' checkpoints."""
    shapes = [p.shape for p in new_model().parameters()]
    shards = [torch.tensor(rank["shards"]["flat"]) for rank in two_ranks]
    whole = stitch_island_anchor(Parallelism.fsdp, shapes, shards)
    assert whole.tolist() == two_ranks[0]["shards"]["before"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ddp_island_equals_one_rank_with_the_island_batch(
    two_ranks: list[dict[str, Any]], grad_accum: int
) -> None:
    """2 DDP ranks with batch b (x grad_accum micro-batches) end where one rank with batch
    2b (x grad_accum) ends: parameters and moments within 1e-4 relative; both ranks hold the
    same replica; the mean of the ranks' losses is the island batch's loss."""
    key = f"ddp-{grad_accum}-0.0"
    rank_0, rank_1 = (rank[key] for rank in two_ranks)
    reference = one_rank(grad_accum, 0.0)
    initial = torch.cat([full(p) for p in new_model().parameters()]).tolist()
    assert relative(reference["params"], initial) > 1e-2  # room for the comparison to fail
    assert rank_0["params"] == rank_1["params"]
    assert_close_runs(rank_0, reference, 1e-4)
    island_losses = [(a + b) / 2 for a, b in zip(rank_0["losses"], rank_1["losses"], strict=True)]
    assert island_losses == pytest.approx(reference["losses"], rel=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fsdp_island_equals_the_ddp_island(
    two_ranks: list[dict[str, Any]], grad_accum: int
) -> None:
    """FSDP2 over the same 2 ranks ends where DDP ends (and so where one rank ends):
    parameters and moments within 1e-4 relative."""
    for rank in two_ranks:
        assert_close_runs(rank[f"fsdp-{grad_accum}-0.0"], rank[f"ddp-{grad_accum}-0.0"], 1e-4)
    assert_close_runs(two_ranks[0][f"fsdp-{grad_accum}-0.0"], one_rank(grad_accum, 0.0), 1e-4)


@pytest.mark.timeout(300)
def test_fsdp_clips_the_island_gradient(two_ranks: list[dict[str, Any]]) -> None:
    """With every step clipped, FSDP2's clip (a norm over DTensor shards of the whole island)
    equals one rank's clip of the whole batch's gradient."""
    reference = one_rank(1, 0.02)
    assert relative(reference["params"], one_rank(1, 0.0)["params"]) > 1e-3  # it did clip
    for rank in two_ranks:
        assert relative(rank["fsdp-1-0.02"]["params"], reference["params"]) < 1e-4


@pytest.mark.timeout(300)
def test_fsdp_local_parameters_are_the_shards_in_place(two_ranks: list[dict[str, Any]]) -> None:
    """Each rank's local parameters are its dim-0 shards (uneven for the 61-row embedding:
    31 + 30 rows), together exactly the model's elements; writing them moves the model."""
    numels = [rank["shards"]["numels"] for rank in two_ranks]
    total = [p.numel() for p in new_model().parameters()]
    assert [a + b for a, b in zip(*numels, strict=True)] == total
    d = GPT_CONFIG.d_model
    assert (numels[0][0], numels[1][0]) == (31 * d, 30 * d)  # wte (tied with lm_head)
    for rank in two_ranks:
        assert rank["shards"]["shift"] == pytest.approx([1.0] * sum(total), abs=1e-6)


@pytest.mark.timeout(300)
def test_gradients_are_synchronised_once_per_inner_step(two_ranks: list[dict[str, Any]]) -> None:
    """With 2 micro-batches DDP all-reduces as many buckets as with 1 (no_sync on the first);
    FSDP2 reduce-scatters nothing inside gradient_sync_paused and everything after."""
    for rank in two_ranks:
        once, twice = rank["ddp_all_reduces"]
        assert once == twice > 0
        assert rank["fsdp_paused"] == [False, True]


def _mesh_rank(port: int, world_rank: int) -> dict[str, Any]:
    """One of 4 processes: 2 islands x 2 ranks in one world (the torch transport's layout)."""
    dist.init_process_group(
        "gloo", store=connect_store(port), rank=world_rank, world_size=4, timeout=TIMEOUT
    )
    try:
        layout = resolve_mesh(
            world_size=4,
            world_rank=world_rank,
            num_islands=2,
            islands_share_world=True,
            configured_ranks=2,
            parallel=Parallelism.fsdp,
        )
        mesh = build_mesh(layout, CPU)
        assert mesh.island_group is not None and mesh.shard_group is not None
        sums = []
        for group in (mesh.island_group, mesh.shard_group):  # the groups work: sum the ranks
            value = torch.tensor([float(world_rank)])
            dist.all_reduce(value, group=group)
            sums.append(int(value.item()))
        return {
            "island": (layout.island, layout.island_rank),
            "island_group": dist.get_process_group_ranks(mesh.island_group),
            "shard_group": dist.get_process_group_ranks(mesh.shard_group),
            "sums": sums,
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.slow  # four processes; tests/e2e/test_island_ranks.py runs a 2 x 2 world in make test
def test_mesh_of_two_islands_of_two_ranks() -> None:
    """World rank w is rank w % 2 of island w // 2; its island group is {2i, 2i+1} and its
    shard group {r, 2 + r}; an all-reduce over each sums exactly those ranks."""
    store = tcp_store()
    ranks = spawn_children(_mesh_rank, [(store.port, w) for w in range(4)], timeout_s=240)
    assert [rank["island"] for rank in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [rank["island_group"] for rank in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [rank["shard_group"] for rank in ranks] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [rank["sums"] for rank in ranks] == [[1, 2], [1, 4], [5, 2], [5, 4]]
