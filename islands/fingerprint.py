"""What must be equal on every island of a group, by name (checked when islands join).

The model's parameter names, shapes and dtypes, its size and its initial weights (a model
factory must build the same weights everywhere); and the settings the outer rounds depend on,
which a coordinator, which has no model, checks from its own config (`group_settings`).
"""

from __future__ import annotations

import hashlib
import json

import torch

from diloco.config import IslandConfig
from diloco.outer.pseudo_gradient import flatten_params
from diloco.parallel.mesh import IslandLayout
from diloco.shared_state import params_sha256
from diloco.transports.grpc.coordinator import PARAMETERS_KEY


def group_fingerprint(
    config: IslandConfig, model: torch.nn.Module, layout: IslandLayout
) -> dict[str, str]:
    """The island's fingerprint; `layout` is where this process sits (island.ranks as
    launched: every island of a group must have as many ranks, and the same parallelism, so
    that shard r of each is the same part of the parameters)."""
    shapes = "\n".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in model.named_parameters())
    flat = flatten_params(list(model.parameters()))
    return {
        "model": hashlib.sha256(shapes.encode()).hexdigest()[:16],
        PARAMETERS_KEY: str(flat.numel()),
        "initial weights": params_sha256(flat)[:16],
        "island.ranks, parallel": f"{layout.ranks_per_island}, {layout.parallel.value}",
        **group_settings(config),
    }


def group_settings(config: IslandConfig) -> dict[str, str]:
    """The settings part of the fingerprint: what a coordinator, which has no model, checks."""
    outer = config.outer
    return {
        "outer.rounds": str(outer.rounds),
        "outer.inner_steps": str(outer.inner_steps),
        "outer.codec, block_size, topk_fraction": (
            f"{outer.codec.value}, {outer.block_size}, {outer.topk_fraction}"
        ),
        "outer.optimizer": optimizer_settings(config),
        "outer.fragments, overlap_steps, mix, eager": (
            f"{outer.fragments}, {outer.overlap_steps}, {outer.mix}, {outer.eager}"
        ),
        "transport.islands": str(config.transport.islands),
    }


def optimizer_settings(config: IslandConfig) -> str:
    """The outer optimizer and every setting it reads, as one comparable string."""
    outer = config.outer
    if outer.optimizer == "sgd":
        rule = f"sgd: lr={outer.lr}, momentum={outer.momentum}, nesterov={outer.nesterov}"
    elif outer.optimizer == "adam":
        rule = f"adam: lr={outer.lr}, betas={list(outer.betas)}, eps={outer.eps}"
    else:
        args = json.dumps(dict(outer.optimizer_args), sort_keys=True, default=str)
        rule = f"{outer.optimizer}: {args}"
    schedule = outer.schedule()
    if schedule == type(schedule)(
        rounds=outer.rounds,
        inner_steps=outer.inner_steps,
        lr=outer.step_lr,
        momentum=outer.step_momentum,
    ):
        return rule  # the defaults: no schedule to compare
    return f"{rule}; schedule {schedule}"
