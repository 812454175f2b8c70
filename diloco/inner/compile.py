"""`run.compile`: the inner model through `torch.compile` (TorchInductor kernels).

The compiled wrapper shares the model's parameters, so the inner AdamW, the outer sync (which
holds the original module's parameters), checkpoints and the fingerprint all see the same
tensors; only the forward and backward run as generated kernels. Switching between training
and evaluation (and JEST's larger scoring batches) compiles one more graph each, once.
On a CPU Inductor needs a C++ compiler; see bench/compile.py for what it gains.

https://pytorch.org/docs/stable/generated/torch.compile.html
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


def compile_inner_model(model: nn.Module, enabled: bool) -> nn.Module:
    """`model` compiled with torch.compile when `enabled`, else `model` itself."""
    if not enabled:
        return model
    return cast(nn.Module, torch.compile(model))


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a torch.compile wrapper holds (the model itself when not compiled)."""
    original = getattr(model, "_orig_mod", model)
    assert isinstance(original, nn.Module)
    return original
