"""Flat parameter vectors, the pseudo-gradient, and the weighted mean of the islands."""

from __future__ import annotations

import pytest
import torch

from diloco.aggregate import weighted_mean
from diloco.models import GPT, GPTConfig
from diloco.outer.pseudo_gradient import copy_flat_into_, flatten_params, pseudo_gradient


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, d_model=8, vocab_size=16, context=4))


def test_flatten_is_a_float32_copy_in_order() -> None:
    """Parameters are concatenated in order, as fp32, and the result does not alias them."""
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([5.0], dtype=torch.bfloat16)
    flat = flatten_params([a, b])
    assert flat.dtype == torch.float32
    assert torch.equal(flat, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    flat[0] = 100.0
    assert a[0, 0] == 1.0


def test_flatten_of_nothing_is_empty() -> None:
    """No parameters: an empty fp32 vector, not an error."""
    flat = flatten_params([])
    assert flat.shape == (0,) and flat.dtype == torch.float32


def test_copy_flat_into_round_trip() -> None:
    """copy_flat_into_(params, flatten_params(params')) makes params equal to params'."""
    params = [torch.zeros(2, 3), torch.zeros(4), torch.zeros(1, 1, 2)]
    flat = torch.arange(12, dtype=torch.float32)
    copy_flat_into_(params, flat)
    assert torch.equal(params[0], torch.tensor([[0.0, 1, 2], [3, 4, 5]]))
    assert torch.equal(params[1], torch.tensor([6.0, 7, 8, 9]))
    assert torch.equal(params[2], torch.tensor([[[10.0, 11]]]))
    assert torch.equal(flatten_params(params), flat)


def test_copy_flat_into_refuses_a_vector_of_the_wrong_length() -> None:
    """A flat vector longer than the parameters is our bug, caught by the invariant."""
    with pytest.raises(AssertionError, match="flat vector has 5 elements, params 4"):
        copy_flat_into_([torch.zeros(4)], torch.zeros(5))


def test_gpt_tied_weights_are_counted_once_and_round_trip() -> None:
    """The GPT's tied embedding appears once in the flat vector; writing back keeps the tie."""
    model = _tiny_gpt()
    params = list(model.parameters())
    flat = flatten_params(params)
    assert flat.numel() == model.num_params()
    untied = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert flat.numel() == untied - 16 * 8  # lm_head.weight is wte.weight

    new_flat = torch.linspace(-1, 1, flat.numel())
    copy_flat_into_(params, new_flat)
    assert torch.equal(flatten_params(list(model.parameters())), new_flat)
    assert model.lm_head.weight is model.wte.weight


def test_pseudo_gradient_is_anchor_minus_local() -> None:
    """delta = anchor - local, so the outer step moves the anchor towards local."""
    anchor = torch.tensor([1.0, 2.0, -3.0])
    local = torch.tensor([0.5, 2.5, -3.0])
    assert torch.equal(pseudo_gradient(anchor, local), torch.tensor([0.5, -0.5, 0.0]))


def test_weighted_mean_exact_values() -> None:
    """sum(w_i v_i) / sum(w_i), exact when the weights are powers of two."""
    vectors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor([5.0, 6.0])]
    mean = weighted_mean(vectors, [1.0, 1.0, 2.0])
    assert mean.dtype == torch.float32
    assert torch.equal(mean, torch.tensor([3.5, 3.0]))


def test_weighted_mean_single_vector_and_fp32_output() -> None:
    """One island: the mean is its own vector, returned in fp32 whatever came in."""
    vector = torch.tensor([0.25, -1.5], dtype=torch.float64)
    mean = weighted_mean([vector], [7.0])
    assert mean.dtype == torch.float32
    assert torch.equal(mean, torch.tensor([0.25, -1.5]))


def test_weighted_mean_sums_in_the_given_order() -> None:
    """The sum runs in list order (fp32 addition is not associative): equal inputs in equal
    order give equal bits, and reversing the order here changes the last bit."""
    big, small = torch.tensor([2.0**26]), torch.tensor([4.0])
    vectors, weights = [big, small, small], [1.0, 1.0, 2.0]
    forward = weighted_mean(vectors, weights)
    # 2**24 + 1 rounds to 2**24 (ties to even), then + 2 -> 2**24 + 2.
    assert forward.item() == 2.0**24 + 2
    backward = weighted_mean(vectors[::-1], weights[::-1])
    # 2 + 1 = 3 first, then 2**24 + 3 rounds to 2**24 + 4.
    assert backward.item() == 2.0**24 + 4
    assert torch.equal(weighted_mean(vectors, weights), forward)


def test_weighted_mean_refuses_mismatched_lengths() -> None:
    """One weight per vector, or a ValueError naming both counts."""
    with pytest.raises(ValueError, match="need one weight per vector, got 2 and 1"):
        weighted_mean([torch.zeros(2), torch.zeros(2)], [1.0])
    with pytest.raises(ValueError, match="nothing to average"):
        weighted_mean([], [])


def test_weighted_mean_refuses_zero_total_weight() -> None:
    """Weights summing to zero would divide by zero: a ValueError listing them."""
    with pytest.raises(ValueError, match=r"weights must sum to > 0, got \[0.0, 0.0\]"):
        weighted_mean([torch.ones(2), torch.ones(2)], [0.0, 0.0])
