"""run.compile: the compiled wrapper shares the model's parameters and computes the same step."""

from __future__ import annotations

import copy

import pytest
import torch

from diloco.inner import InnerTrainer
from diloco.inner.compile import compile_inner_model, uncompiled
from diloco.inner.config import InnerConfig
from diloco.models.gpt import GPT, GPTConfig


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, vocab_size=32, context=8))


def test_off_is_the_model_itself() -> None:
    model = tiny_gpt()
    assert compile_inner_model(model, False) is model
    assert uncompiled(model) is model


@pytest.mark.slow
def test_a_compiled_step_shares_the_parameters_and_matches_eager() -> None:
    """The outer sync holds the original's parameters: AdamW must update those very tensors,
    with eager's loss and gradients (Inductor on a CPU needs a C++ compiler; 10-60 s here)."""
    eager_model = tiny_gpt()
    compiled_model = copy.deepcopy(eager_model)
    wrapper = compile_inner_model(compiled_model, True)
    assert wrapper is not compiled_model and uncompiled(wrapper) is compiled_model
    shared = [p.data_ptr() for p in compiled_model.parameters()]
    assert [p.data_ptr() for p in wrapper.parameters()] == shared
    tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
    eager_loss, compiled_loss = eager_model(tokens), wrapper(tokens)
    eager_loss.backward()
    compiled_loss.backward()
    assert abs(eager_loss.item() - compiled_loss.item()) < 1e-5
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    before = [p.detach().clone() for p in compiled_model.parameters()]
    trainer = InnerTrainer(wrapper, InnerConfig(lr=1e-2, warmup_steps=0), 10, torch.device("cpu"))
    trainer.train_step(tokens)
    assert all(
        not torch.equal(p, q) for p, q in zip(compiled_model.parameters(), before, strict=True)
    )
