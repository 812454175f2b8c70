"""The DESIGN invariant: one island with outer lr 1 and no momentum is plain AdamW training.

The outer step then sets anchor := anchor - (anchor - local) = local, so every H the island
continues exactly where its inner loop was; the loss trajectory must equal a plain
`torch.optim.AdamW` loop (written here independently of InnerTrainer) step for step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diloco.codecs import NoneCodec
from diloco.inner import InnerTrainer, warmup_cosine_lr
from diloco.inner.config import InnerConfig
from diloco.models import GPT, GPTConfig
from diloco.outer import OuterHyperparams, OuterSync, SgdOuter
from diloco.transports import LocalGroup

STEPS = 20
INNER = InnerConfig(lr=1e-2, warmup_steps=4, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0)


def _batches() -> list[torch.Tensor]:
    # Two batches in turn: learnable, so the trajectory has somewhere to go.
    generator = torch.Generator().manual_seed(7)
    pair = [torch.randint(0, 32, (4, 17), generator=generator) for _ in range(2)]
    return [pair[step % 2] for step in range(STEPS)]


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, d_model=32, vocab_size=32, context=16))


def _plain_adamw_losses(model: GPT, batches: list[torch.Tensor]) -> list[float]:
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": INNER.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ],
        lr=INNER.lr,
        betas=(INNER.beta1, INNER.beta2),
    )
    losses = []
    for step, batch in enumerate(batches):
        lr = warmup_cosine_lr(
            step,
            peak_lr=INNER.lr,
            warmup_steps=INNER.warmup_steps,
            total_steps=STEPS,
            min_lr_ratio=INNER.min_lr_ratio,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), INNER.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _diloco_losses(model: GPT, batches: list[torch.Tensor], inner_steps: int) -> list[float]:
    trainer = InnerTrainer(model, INNER, total_steps=STEPS, device=torch.device("cpu"))
    transport = LocalGroup(1, NoneCodec(), sum(p.numel() for p in model.parameters())).transport(0)
    hyper = OuterHyperparams(inner_steps=inner_steps)
    plain = SgdOuter(lr=1.0, momentum=0.0, nesterov=False)
    outer = OuterSync(model.parameters(), transport, NoneCodec(), plain, hyper)
    losses, syncs = [], 0
    for batch in batches:
        losses.append(trainer.train_step(batch).item())
        syncs += outer.after_inner_step(tokens=batch.numel()) is not None
    assert syncs == STEPS // inner_steps
    return losses


@pytest.mark.parametrize("inner_steps", [1, 5])
def test_one_island_without_momentum_is_plain_adamw(inner_steps: int) -> None:
    model = _model()
    reference = _plain_adamw_losses(copy.deepcopy(model), _batches())
    ours = _diloco_losses(model, _batches(), inner_steps)
    assert reference[-1] < reference[0] - 0.5, "the reference must actually train"
    # anchor - (anchor - local) rounds to within an ulp of local, hence not bit-exact.
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(reference), rtol=1e-5, atol=1e-6)


def test_outer_momentum_changes_the_trajectory() -> None:
    """The comparison above can fail: with Nesterov momentum the trajectory departs."""
    model = _model()
    reference = _plain_adamw_losses(copy.deepcopy(model), _batches())
    trainer = InnerTrainer(model, INNER, total_steps=STEPS, device=torch.device("cpu"))
    transport = LocalGroup(1, NoneCodec(), sum(p.numel() for p in model.parameters())).transport(0)
    nesterov = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
    outer = OuterSync(
        model.parameters(), transport, NoneCodec(), nesterov, OuterHyperparams(inner_steps=5)
    )
    losses = []
    for batch in _batches():
        losses.append(trainer.train_step(batch).item())
        outer.after_inner_step(tokens=batch.numel())
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) > 1e-3
