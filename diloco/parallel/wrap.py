"""Wrapping an island's model for its parallelism, and the parameters each rank owns.

DDP (https://pytorch.org/docs/stable/notes/ddp.html) keeps a full replica on every rank of
the island and all-reduces the gradients each inner step; FSDP2 (`fully_shard`,
https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html) shards each parameter
along dim 0 over the island's ranks, as DTensors. Blocks are sharded one by one, then the root
(torchtitan's order), so that one block's parameters are gathered at a time. Parameters stay
fp32: bf16 compute comes from the trainer's autocast, as on one rank.

The outer sync reads and writes what this rank owns: `local_parameters` (FSDP2: each shard;
DDP and none: the parameters), in the module's parameter order, identical on every island.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diloco.parallel.config import Parallelism
from diloco.parallel.mesh import IslandMesh


def wrap_model(model: nn.Module, mesh: IslandMesh, device: torch.device) -> nn.Module:
    """`model` (already on `device`) ready for the island's inner loop.

    Every rank of the island must call this, with replicas built the same way (same seed):
    DDP broadcasts rank 0's parameters; FSDP2 keeps each rank's own slice of its replica.

    Returns:
        none: `model` itself; ddp: a DistributedDataParallel over the island group; fsdp:
        `model`, sharded in place (its class becomes an FSDPModule).
    """
    parallel = mesh.layout.parallel
    if parallel is Parallelism.none:
        return model
    if mesh.island_group is None:
        raise ValueError(f"island.parallel={parallel.value} needs the mesh's island group")
    if parallel is Parallelism.ddp:
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=mesh.island_group,
        )
    return _fully_shard(model, mesh.island_group, mesh.device_type)


def _fully_shard(model: nn.Module, group: dist.ProcessGroup, device_type: str) -> nn.Module:
    # Imported here: torch.distributed.fsdp takes seconds to import, and most runs never shard.
    from torch.distributed.device_mesh import DeviceMesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under its composable name
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore[attr-defined, unused-ignore]

    device_mesh = DeviceMesh.from_group(group, device_type)
    for block in sharded_blocks(model):
        fully_shard(block, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return model


def sharded_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards before the root: the items of the outermost `nn.ModuleList`s
    (the built-in GPT's `blocks`, a Hugging Face model's `layers` or `h`), in module order.
    A model without one is sharded as a single unit (its root)."""
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or module is model:
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue  # a list inside a block already sharded
        taken.append(name)
        blocks.extend(module)
    return blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a torch.compile and a DDP wrapper (FSDP2 shards in place:
    the model itself)."""
    model = _uncompiled(model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def _uncompiled(model: nn.Module) -> nn.Module:
    # run.compile wraps the parallel model (compile after DDP / fully_shard, as their docs do).
    original = getattr(model, "_orig_mod", model)
    assert isinstance(original, nn.Module)
    return original


@torch.no_grad()
def local_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameter tensors this rank owns, in the module's parameter order.

    FSDP2: each DTensor parameter's local shard (dim-0 slice; possibly empty on the last
    ranks when a dimension is smaller than the island); DDP and none: the parameters. The
    tensors share storage with the model: write into them in place (e.g.
    `diloco.outer.pseudo_gradient.copy_flat_into_`) and the model sees the new values.
    """
    # The DTensor class comes from the parameter itself: importing torch.distributed.tensor
    # costs seconds, and without FSDP2 no parameter is one.
    return [_local_tensor(p).detach() for p in unwrap(model).parameters()]


def _local_tensor(param: torch.Tensor) -> torch.Tensor:
    to_local = getattr(param, "to_local", None)
    return param if to_local is None else to_local()


def gradient_sync_paused(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """A context in which backward accumulates gradients on this rank without synchronising
    them over the island (all micro-batches of a step but the last): DDP's `no_sync()`,
    FSDP2's `set_requires_gradient_sync(False)`; nothing to pause for a plain module."""
    model = _uncompiled(model)
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule (duck-typed: see above)
        return _fsdp_sync_paused(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync_paused(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def reshard(model: nn.Module) -> None:
    """Drop FSDP2's gathered (unsharded) parameters, so that the next forward gathers the
    shards as they are now. FSDP2 keeps the root's parameters gathered after a forward until
    its backward: after a forward without one (evaluation) a write to the local shards (the
    outer step, Streaming DiLoCo's merge) would otherwise go unseen. No-op without FSDP2."""
    for module in _uncompiled(model).modules():
        if hasattr(module, "reshard") and hasattr(module, "set_requires_gradient_sync"):
            module.reshard()  # type: ignore[operator]
