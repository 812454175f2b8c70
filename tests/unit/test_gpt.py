"""The built-in GPT and `build_model`: forward returns the loss; user models via a factory."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from diloco.errors import ConfigError
from diloco.models import GPT, GPTConfig, build_model
from diloco.models.config import ModelConfig

TINY = GPTConfig(n_layer=2, n_head=2, d_model=16, vocab_size=256, context=8)


def tiny_gpt(config: GPTConfig = TINY) -> GPT:
    torch.manual_seed(0)
    return GPT(config)


def tokens(batch: int, length: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def test_forward_is_a_scalar_loss_near_uniform_at_init() -> None:
    """At init the logits are small: the loss is close to ln(vocab) = ln 256."""
    loss = tiny_gpt()(tokens(4, 9))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(256)) < 0.1


def test_backward_reaches_every_parameter() -> None:
    """The loss is differentiable and every parameter gets a finite, non-zero gradient."""
    model = tiny_gpt()
    model(tokens(2, 9)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_forward_is_causal() -> None:
    """Changing the last input token does not change the logits of earlier positions."""
    model = tiny_gpt().eval()
    idx = tokens(1, 8)
    changed = idx.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    with torch.no_grad():
        a, b = model.logits(idx), model.logits(changed)
    assert a.shape == (1, 8, 256)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])


def test_full_context_is_accepted_and_overflow_raises() -> None:
    """context + 1 tokens (T = context inputs) fit; one more is a ValueError naming both."""
    model = tiny_gpt()
    model(tokens(1, 9))
    with pytest.raises(ValueError, match="sequence of 9 tokens is longer than the context 8"):
        model(tokens(1, 10))


def test_num_params_counts_the_tied_embedding_once() -> None:
    """lm_head shares wte's matrix: counted once, and it is the same tensor."""
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight
    D, V, C, L = 16, 256, 8, 2
    per_block = 2 * (2 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D)
    per_block += 4 * D * D + D
    expected = V * D + C * D + L * per_block + 2 * D
    assert model.num_params() == expected
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_build_model_gpt_from_config() -> None:
    """model.name gpt builds the GPT with the config's sizes and the given context."""
    config = ModelConfig(n_layer=1, n_head=2, d_model=8, vocab_size=32)
    model = build_model(config, context=5)
    assert isinstance(model, GPT)
    assert model.config == GPTConfig(n_layer=1, n_head=2, d_model=8, vocab_size=32, context=5)


class Linear2(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).square().mean()


def linear_model(width: int) -> nn.Module:
    return Linear2(width)


def not_a_module(**kwargs: Any) -> object:
    return {"weights": [1, 2]}


def test_build_model_from_a_module_factory() -> None:
    """module:factory is called with model.args and its module returned."""
    model = build_model(ModelConfig(name=f"{__name__}:linear_model", args={"width": 3}), 4)
    assert isinstance(model, Linear2) and model.linear.in_features == 3


def test_build_model_refuses_a_factory_returning_a_non_module() -> None:
    """A factory that returns anything but an nn.Module is a ConfigError naming model.name."""
    with pytest.raises(
        ConfigError, match=r"model.name: '.*:not_a_module' returned dict, not a torch.nn.Module"
    ):
        build_model(ModelConfig(name=f"{__name__}:not_a_module"), 4)
