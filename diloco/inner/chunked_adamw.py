"""torch's AdamW on the CPU, stepping large parameters a slice at a time.

torch's CPU AdamW (the single-tensor loop: `foreach` and `fused` are CUDA defaults) forms two
temporaries of each parameter's size in every step: the square root of the second moment and
its quotient by the bias correction. For a parameter of 64M values that is 512 MiB on top of
the island's state (parameters, gradients, two moments, anchor, outer momentum: 6x), its
largest term at the training step's peak (bench/grpc_memory.py). `ChunkedAdamW` hands torch's
own update the same parameters as contiguous slices of `CHUNK_NUMEL` values, so each
temporary is at most one slice (4 MiB): every operation of the update is elementwise, so the
result is the same, bit for bit (tested against `torch.optim.AdamW` for sizes around the slice
length and thread counts), and the state is the same object with the same keys, so checkpoints
move between the two.

Only what the single-tensor loop runs is sliced: plain CPU tensors, contiguous, real, with
`foreach`, `fused`, `capturable` and `differentiable` off. Anything else (a CUDA or FSDP2
parameter, a complex one) is stepped whole, exactly as `torch.optim.AdamW` does.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_NUMEL = 1 << 20
"""Values per slice: two temporaries of 4 MiB, and torch's few Python calls per slice (25
slices for 25M values); the whole step measured 0.39x to 0.66x torch's time for 64M values,
its temporaries no longer faulted in afresh (bench/chunked_adamw.py)."""


def _sliceable(param: torch.Tensor, state: list[torch.Tensor], group: dict[str, Any]) -> bool:
    return (
        type(param.data) is torch.Tensor  # not a DTensor (FSDP2) or other subclass
        and param.device.type == "cpu"
        and not param.is_complex()
        and all(tensor.is_contiguous() for tensor in (param, *state))
        and param.numel() > CHUNK_NUMEL
        and not any(
            group.get(flag) for flag in ("foreach", "fused", "capturable", "differentiable")
        )
    )


def _slices(tensor: torch.Tensor) -> list[torch.Tensor]:
    flat = tensor.view(-1)
    return [flat[start : start + CHUNK_NUMEL] for start in range(0, flat.numel(), CHUNK_NUMEL)]


class ChunkedAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` whose CPU step touches large parameters one slice at a time.

    Same arguments, state and results as `torch.optim.AdamW`; see the module docstring.
    """

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        max_exp_avg_sqs: list[torch.Tensor],
        state_steps: list[torch.Tensor],
    ) -> bool:
        # torch's step() calls this to list what its update takes, then runs the update over
        # the lists: the slices go in their place. Every slice of a parameter but its first
        # gets a copy of the step count, taken before the update adds one to it, so each
        # slice computes the same bias corrections and the state's own count moves once.
        whole: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
        has_complex = super()._init_group(group, *whole)  # type: ignore[no-untyped-call]
        params, grad_list, avgs, avg_sqs, max_avg_sqs, steps = whole
        amsgrad = bool(group.get("amsgrad"))
        for index, param in enumerate(params):
            state = [grad_list[index], avgs[index], avg_sqs[index]]
            state += [max_avg_sqs[index]] if amsgrad else []
            if not _sliceable(param, state, group):
                params_with_grad.append(param)
                grads.append(grad_list[index])
                exp_avgs.append(avgs[index])
                exp_avg_sqs.append(avg_sqs[index])
                if amsgrad:
                    max_exp_avg_sqs.append(max_avg_sqs[index])
                state_steps.append(steps[index])
                continue
            param_slices = _slices(param.detach())
            params_with_grad.extend(param_slices)
            grads.extend(_slices(grad_list[index]))
            exp_avgs.extend(_slices(avgs[index]))
            exp_avg_sqs.extend(_slices(avg_sqs[index]))
            if amsgrad:
                max_exp_avg_sqs.extend(_slices(max_avg_sqs[index]))
            step = steps[index]
            state_steps.append(step)
            state_steps.extend(step.clone() for _ in param_slices[1:])
        return bool(has_complex)
