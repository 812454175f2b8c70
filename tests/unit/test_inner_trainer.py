"""InnerTrainer: AdamW steps on one island's replica, with the schedule and decay groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from diloco.inner import InnerTrainer, move_to, param_groups, warmup_cosine_lr
from diloco.inner.config import InnerConfig
from diloco.models import GPT, GPTConfig

CPU = torch.device("cpu")


class Regression(nn.Module):
    """forward(x) -> scalar MSE against a fixed target; has a matrix, a bias and a norm gain."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.norm(self.linear(x)) - 0.5).square().mean()


class VectorLoss(Regression):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (self.linear(x) - 0.5).square().mean(dim=1)


class FloatLoss(Regression):
    def forward(self, x: torch.Tensor) -> float:  # type: ignore[override]
        return 0.25


def trainer(model: nn.Module, **overrides: float) -> InnerTrainer:
    settings = {"lr": 1e-2, "warmup_steps": 0, "min_lr_ratio": 0.1, **overrides}
    return InnerTrainer(model, InnerConfig(**settings), total_steps=10, device=CPU)  # type: ignore[arg-type]


def regression() -> Regression:
    torch.manual_seed(0)
    return Regression()


X = torch.linspace(-1, 1, 12).reshape(4, 3)


def test_loss_decreases_on_a_repeated_batch() -> None:
    """Twenty AdamW steps on one batch of a tiny GPT fit it: the loss drops well below ln 16."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, d_model=16, vocab_size=16, context=8))
    inner = InnerTrainer(
        model, InnerConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0), total_steps=20, device=CPU
    )
    batch = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = [inner.train_step(batch).item() for _ in range(20)]
    assert abs(losses[0] - math.log(16)) < 0.2
    assert losses[-1] < 0.6 * losses[0]
    assert inner.step_count == 20


def test_train_step_returns_a_detached_loss_and_clears_grads() -> None:
    """The returned loss needs no graph; gradients are freed after the step."""
    model = regression()
    loss = trainer(model).train_step(X)
    assert loss.dim() == 0 and not loss.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_lr_follows_the_schedule() -> None:
    """Step k runs with warmup_cosine_lr(k): every group's lr is set before each step."""
    inner = trainer(regression(), warmup_steps=3)
    for step in range(12):
        inner.train_step(X)
        expected = warmup_cosine_lr(
            step, peak_lr=1e-2, warmup_steps=3, total_steps=10, min_lr_ratio=0.1
        )
        assert inner.lr_at(step) == expected
        assert [g["lr"] for g in inner.optimizer.param_groups] == [expected, expected]
    assert inner.lr_at(0) == pytest.approx(1e-2 / 3)
    assert inner.lr_at(10) == pytest.approx(1e-3)


def test_weight_decay_only_on_matrices() -> None:
    """Matrices decay; biases and norm gains do not; frozen parameters are left out."""
    model = regression()
    decayed, plain = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [id(p) for p in decayed["params"]] == [id(model.linear.weight)]
    assert {id(p) for p in plain["params"]} == {
        id(model.linear.bias),
        id(model.norm.weight),
        id(model.norm.bias),
    }
    groups = trainer(model, weight_decay=0.1).optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


@pytest.mark.parametrize(
    "model_type,got", [(VectorLoss, r"Tensor\(4,\)"), (FloatLoss, r"float\(\)")]
)
def test_model_must_return_a_scalar_loss(model_type: type[nn.Module], got: str) -> None:
    """A forward that returns anything but a 0-d tensor is a TypeError saying what it got."""
    inner = trainer(model_type())
    with pytest.raises(
        TypeError, match="forward must return the scalar loss of the batch, got " + got
    ):
        inner.train_step(X)
    assert inner.step_count == 0


def test_evaluate_is_the_mean_loss_in_eval_mode() -> None:
    """evaluate averages the batch losses without training, and leaves train mode on."""
    model = regression()
    inner = trainer(model)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = (model(X) + model(X[:2])) / 2
    assert inner.evaluate([X, X[:2]]) == pytest.approx(expected.item(), rel=1e-6)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert math.isnan(inner.evaluate([]))


def test_state_dict_round_trip_continues_identically() -> None:
    """A trainer restored from another's state (step count and AdamW moments) takes the same
    next step as the original."""
    original_model = regression()
    original = trainer(original_model, warmup_steps=2)
    for _ in range(3):
        original.train_step(X)
    state = copy.deepcopy(original.state_dict())
    restored_model = copy.deepcopy(original_model)
    restored = trainer(restored_model, warmup_steps=2)
    restored.load_state_dict(state)
    assert restored.step_count == 3

    original.train_step(X)
    restored.train_step(X)
    for a, b in zip(original_model.parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(a, b)
    fresh_model = copy.deepcopy(restored_model)
    trainer(fresh_model).train_step(X)  # without the state: a different step
    assert not torch.equal(fresh_model.linear.weight, restored_model.linear.weight)


def test_reset_optimizer_state_clears_moments_but_not_the_schedule() -> None:
    """reset_optimizer_state drops AdamW's moments; the step count (schedule) goes on."""
    inner = trainer(regression(), weight_decay=0.2)
    for _ in range(2):
        inner.train_step(X)
    assert len(inner.optimizer.state) == 4
    inner.reset_optimizer_state()
    assert len(inner.optimizer.state) == 0 and inner.step_count == 2
    assert [g["weight_decay"] for g in inner.optimizer.param_groups] == [0.2, 0.0]
    inner.train_step(X)
    assert int(next(iter(inner.optimizer.state.values()))["step"]) == 1


def test_move_to_handles_nested_inputs() -> None:
    """Tensors inside tuples, lists and dicts are moved; other values pass through."""
    inputs = {"a": (torch.ones(1), [torch.zeros(2), "label"]), "n": 3}
    moved = move_to(inputs, CPU)
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)
    assert torch.equal(moved["a"][1][0], torch.zeros(2)) and moved["a"][1][1] == "label"
    assert moved["n"] == 3
