"""An FSDP2 rank's AdamW state as plain tensors for its checkpoint, and back.

FSDP2 parameters are DTensors, and so is the AdamW state of each (`exp_avg`, `exp_avg_sq`).
A rank's checkpoint holds only what the rank owns (its local shards: per-rank files, no
gather), as plain tensors that safetensors can store; loading wraps each back into a DTensor
laid out like its parameter (same mesh, placements, global shape), since AdamW's update
refuses to mix DTensor parameters with plain state. Without FSDP2 both are the identity.
"""

from __future__ import annotations

from typing import Any

import torch


def local_state(value: Any) -> Any:
    """`value` (an optimizer state_dict, nested) with every DTensor replaced by its local
    shard; everything else as it is."""
    if isinstance(value, dict):
        return {key: local_state(item) for key, item in value.items()}
    if isinstance(value, list):
        return [local_state(item) for item in value]
    to_local = getattr(value, "to_local", None)
    if isinstance(value, torch.Tensor) and to_local is not None:
        return to_local()
    return value


def restore_dtensor_state_(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict` of a `local_state`: make each state tensor of a
    DTensor parameter a DTensor again, laid out like the parameter."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            mesh = getattr(param, "device_mesh", None)
            if mesh is None or param not in optimizer.state:
                continue
            state = optimizer.state[param]
            local_shape = param.to_local().shape
            for key, value in state.items():
                if _is_plain_tensor(value) and value.shape == local_shape and value.dim() > 0:
                    state[key] = type(param).from_local(
                        value,
                        device_mesh=mesh,
                        placements=param.placements,
                        run_check=False,
                        shape=param.shape,
                        stride=param.stride(),
                    )


def _is_plain_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and getattr(value, "to_local", None) is None
