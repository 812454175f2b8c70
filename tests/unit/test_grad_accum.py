"""Gradient accumulation (`inner.grad_accum`): A micro-batches of b rows train as one batch of
A x b rows, and one micro-batch is bit for bit the step without accumulation (issue 13)."""

from __future__ import annotations

import copy

import pytest
import torch

from diloco.errors import ConfigError
from diloco.inner import InnerTrainer
from diloco.inner.config import InnerConfig
from diloco.models import GPT, GPTConfig
from diloco.parallel.batches import rank_micro_batches

CPU = torch.device("cpu")
B = 2  # rows per micro-batch
STEPS = 4
# grad_clip small enough that every step is clipped: the clip sees the accumulated gradient.
INNER = {"lr": 1e-2, "warmup_steps": 1, "min_lr_ratio": 0.1, "grad_clip": 0.05}


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, d_model=16, vocab_size=32, context=8))


def island_batches(rows: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 32, (rows, 9), generator=generator) for _ in range(STEPS)]


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def train(
    grad_accum: int, rows: int, grad_clip: float
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Parameters, AdamW first moments and losses after STEPS steps of A micro-batches."""
    net = model()
    settings = {**INNER, "grad_clip": grad_clip}
    config = InnerConfig(**settings, grad_accum=grad_accum)  # type: ignore[arg-type]
    trainer = InnerTrainer(net, config, total_steps=STEPS, device=CPU)
    losses = []
    for tokens in island_batches(rows):
        micro = rank_micro_batches(tokens, island_rank=0, ranks=1, grad_accum=grad_accum)
        losses.append(trainer.train_step(*micro).item())
    params = list(net.parameters())
    moments = flat([trainer.optimizer.state[p]["exp_avg"] for p in params])
    return flat(params), moments, losses


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("grad_clip", [0.0, INNER["grad_clip"]])
@pytest.mark.parametrize("grad_accum", [2, 4])
def test_accumulated_micro_batches_equal_one_big_batch(grad_accum: int, grad_clip: float) -> None:
    """grad_accum=A with batch b gives the parameters of grad_accum=1 with batch A x b within
    1e-5 relative, and the same AdamW first moments; the returned loss is the mean over the
    micro-batches. Without clipping the moments are scale-sensitive (AdamW's update is not:
    a missing 1/A would hide in the parameters alone); with it, the clip must see the
    accumulated gradient, not each micro-batch's."""
    ref_params, ref_moments, ref_losses = train(1, grad_accum * B, grad_clip)
    params, moments, losses = train(grad_accum, grad_accum * B, grad_clip)
    initial = flat(list(model().parameters()))
    assert relative(ref_params, initial) > 1e-2  # the comparison below has room to fail
    assert relative(params, ref_params) < 1e-5
    assert relative(moments, ref_moments) < 1e-5
    assert losses == pytest.approx(ref_losses, rel=1e-5)


def test_one_micro_batch_is_the_step_without_accumulation() -> None:
    """grad_accum=1 through train_step(inputs) is bit-identical to a hand-written AdamW step
    of the same model (today's path: no scaling, no extra op)."""
    net = model()
    twin = copy.deepcopy(net)
    trainer = InnerTrainer(net, InnerConfig(**INNER), total_steps=STEPS, device=CPU)  # type: ignore[arg-type]
    reference = InnerTrainer(twin, InnerConfig(**INNER), total_steps=STEPS, device=CPU)  # type: ignore[arg-type]
    for tokens in island_batches(B):
        loss = trainer.train_step(tokens)
        # The same step by hand on the twin: loss, backward, clip, AdamW.
        for group in reference.optimizer.param_groups:
            group["lr"] = reference.lr_at(reference.step_count)
        expected = twin(tokens)
        expected.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), INNER["grad_clip"])
        reference.optimizer.step()
        reference.optimizer.zero_grad(set_to_none=True)
        reference.step_count += 1
        assert torch.equal(loss, expected.detach())
    assert torch.equal(flat(list(net.parameters())), flat(list(twin.parameters())))


def test_train_step_takes_exactly_grad_accum_micro_batches() -> None:
    """A wrong number of micro-batches is refused before anything is trained."""
    trainer = InnerTrainer(model(), InnerConfig(grad_accum=2), total_steps=1, device=CPU)
    tokens = island_batches(B)[0]
    with pytest.raises(ValueError, match=r"inner.grad_accum=2 micro-batches, got 1"):
        trainer.train_step(tokens)
    assert trainer.step_count == 0


def test_grad_accum_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"^inner.grad_accum must be >= 1, got 0$"):
        InnerConfig(grad_accum=0)
