"""The inner loop of one island: AdamW steps on the island's own replica.

Weight decay applies to matrices only, not to biases and norm gains (as in nanoGPT); the
learning rate follows `warmup_cosine_lr`; the gradient's global norm is clipped; on a GPU the
forward runs under bf16 autocast and AdamW is fused; on a CPU, AdamW steps large parameters
a slice at a time (`chunked_adamw`: the same results, less memory). The losses stay on the
device until the round ends, so a step never waits for the host.

With gradient accumulation (`inner.grad_accum`) one step takes several micro-batches: each
loss is scaled by 1/grad_accum and its gradient accumulated, the island's ranks synchronise
only on the last micro-batch's backward (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`),
then one clip and one AdamW step (issue 13).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from diloco.inner.chunked_adamw import ChunkedAdamW
from diloco.inner.config import InnerConfig
from diloco.inner.schedule import warmup_cosine_lr
from diloco.parallel.state import local_state, restore_dtensor_state_
from diloco.parallel.wrap import gradient_sync_paused, reshard


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices (decayed) and vectors (biases, norm gains: not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.dim() >= 2]
    plain = [p for p in params if p.dim() < 2]
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def move_to(inputs: Any, device: torch.device) -> Any:
    """`inputs` (a tensor, or tuples, lists and dicts of them) on `device`."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(move_to(item, device) for item in inputs)
    if isinstance(inputs, dict):
        return {key: move_to(value, device) for key, value in inputs.items()}
    return inputs


class InnerTrainer:
    """AdamW training of one replica.

    Args:
        model: an nn.Module whose forward on a batch returns the scalar loss.
        config: the inner optimizer's settings.
        total_steps: inner steps in the whole run (the cosine's length).
        device: where the model lives.
        bf16: run the forward under bf16 autocast.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: InnerConfig,
        total_steps: int,
        device: torch.device,
        bf16: bool = False,
    ):
        self.model = model
        self.config = config
        self.total_steps = total_steps
        self.device = device
        self.bf16 = bf16
        self.step_count = 0
        self.optimizer = self._new_optimizer()

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(
            step,
            peak_lr=self.config.lr,
            warmup_steps=self.config.warmup_steps,
            total_steps=self.total_steps,
            min_lr_ratio=self.config.min_lr_ratio,
        )

    def train_step(self, *micro_batches: Any) -> torch.Tensor:
        """One AdamW step on the gradient of `inner.grad_accum` micro-batches.

        Args:
            micro_batches: the inputs of each micro-batch (one without gradient
                accumulation: `train_step(inputs)`).

        Returns:
            The mean of the micro-batches' losses, detached (still on the device).
        """
        if len(micro_batches) != self.config.grad_accum:
            raise ValueError(
                f"train_step takes inner.grad_accum={self.config.grad_accum} micro-batches, "
                f"got {len(micro_batches)}"
            )
        self.model.train()
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        *paused, last = micro_batches
        losses = []
        for inputs in paused:  # gradients stay on this rank until the last micro-batch
            with gradient_sync_paused(self.model):
                losses.append(self._accumulate(inputs))
        losses.append(self._accumulate(last))
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def _accumulate(self, inputs: Any) -> torch.Tensor:
        """Add the gradient of `inputs`' loss / grad_accum to the parameters' gradients."""
        loss = self.loss(inputs)
        scaled = loss if self.config.grad_accum == 1 else loss / self.config.grad_accum
        scaled.backward()  # type: ignore[no-untyped-call]
        return loss.detach()

    def loss(self, inputs: Any) -> torch.Tensor:
        """The model's loss on `inputs`, under autocast when configured."""
        inputs = move_to(inputs, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(inputs)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(
                "the model's forward must return the scalar loss of the batch, got "
                f"{type(loss).__name__}{tuple(getattr(loss, 'shape', ()))}"
            )
        return loss

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> float:
        """Mean loss over `batches`, in eval mode."""
        self.model.eval()
        reshard(self.model)  # FSDP2: gather the shards as they are now (see `reshard`)
        losses = [self.loss(inputs).float() for inputs in batches]
        reshard(self.model)  # and none stays gathered past a forward without backward
        self.model.train()
        return float(torch.stack(losses).mean().item()) if losses else float("nan")

    def reset_optimizer_state(self) -> None:
        self.optimizer = self._new_optimizer()

    def state_dict(self) -> dict[str, Any]:
        # FSDP2: this rank's shards of the AdamW state, as plain tensors (its own checkpoint).
        optimizer = local_state(self.optimizer.state_dict())
        return {"optimizer": optimizer, "step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        restore_dtensor_state_(self.optimizer)
        self.step_count = int(state["step_count"])

    def _new_optimizer(self) -> torch.optim.AdamW:
        # on a CPU, torch's AdamW stepping large parameters a slice at a time (the same
        # results, without two temporaries of each parameter's size); on a GPU, fused.
        return ChunkedAdamW(
            param_groups(self.model, self.config.weight_decay),
            lr=self.config.lr,
            betas=(self.config.beta1, self.config.beta2),
            fused=self.device.type == "cuda",
        )
