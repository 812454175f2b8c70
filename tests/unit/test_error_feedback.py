"""Error feedback: the residual of what the codec lost is added to the next round.

Sending the same vector x for T rounds, the sum of what was sent is T x - r_T (the residual
after round T): with error feedback the gap to T x is one bounded residual, so it shrinks
relative to T x; without, every round loses the same error and the gap grows like T.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from diloco.codecs import Codec, NoneCodec, build_codec
from diloco.outer import OuterHyperparams, OuterSync, SgdOuter, flatten_params, nesterov_step_
from diloco.outer.error_feedback import compensate, new_residual
from diloco.transports import LocalGroup

ROUNDS = 200
NUMEL = 256
JOIN_S = 20.0


def fixed_vector() -> torch.Tensor:
    # Heavy-tailed like a real pseudo-gradient: Student-t with 3 degrees of freedom.
    torch.manual_seed(0)
    return torch.distributions.StudentT(3.0).sample((NUMEL,))


def send_repeatedly(codec: Codec, x: torch.Tensor, error_feedback: bool) -> dict[str, list[float]]:
    """Send x every round; record |sent - meant| / |meant| and |residual| / |x| per round."""
    residual = torch.zeros_like(x)
    sent_sum = torch.zeros(NUMEL, dtype=torch.float64)
    gaps, residuals = [], []
    for t in range(1, ROUNDS + 1):
        target = compensate(x, residual) if error_feedback else x
        decoded = codec.decode(codec.encode(target), NUMEL)
        if error_feedback:
            residual = new_residual(target, decoded)
        sent_sum += decoded.double()
        meant_sum = t * x.double()
        gaps.append(((sent_sum - meant_sum).norm() / meant_sum.norm()).item())
        residuals.append((residual.norm() / x.norm()).item())
    return {"gap": gaps, "residual": residuals}


def test_pure_functions() -> None:
    delta, residual = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25])
    target = compensate(delta, residual)
    assert target.tolist() == [1.5, -1.75]
    assert new_residual(target, torch.tensor([1.0, -2.0])).tolist() == [0.5, 0.25]
    assert delta.tolist() == [1.0, -2.0]  # inputs are not modified


# Measured (Student-t x, 256 values, block 32): with error feedback the relative gap after 200
# rounds is 5.2e-4 (fp4_e2m1), 9.6e-4 (fp4_e3m0), 0.015 (topk 0.1), and the largest residual
# 0.12 / 0.22 / 3.1 |x|; without it the gap stays at the one-round error 0.10 / 0.18 / 0.65.
CASES = [("fp4_e2m1", 1e-3, 0.2), ("fp4_e3m0", 2e-3, 0.35), ("topk", 0.03, 5.0)]


@pytest.mark.parametrize(("name", "final_gap", "residual_bound"), CASES)
def test_sum_of_what_was_sent_converges_to_what_was_meant(
    name: str, final_gap: float, residual_bound: float
) -> None:
    codec = build_codec(name, block_size=32, topk_fraction=0.1)
    x = fixed_vector()
    with_ef = send_repeatedly(codec, x, error_feedback=True)
    without = send_repeatedly(codec, x, error_feedback=False)
    assert with_ef["gap"][-1] <= final_gap, with_ef["gap"][-1]
    assert with_ef["gap"][-1] < with_ef["gap"][19] / 5  # shrinks like 1 / T
    assert max(with_ef["residual"]) <= residual_bound, max(with_ef["residual"])
    # Without error feedback the same error is lost every round: the relative gap does not
    # shrink, i.e. the absolute gap grows linearly with the rounds.
    assert without["gap"][-1] == pytest.approx(without["gap"][0], rel=1e-3)
    assert without["gap"][-1] > 20 * with_ef["gap"][-1]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # 11 parameters


def one_island(net: nn.Module, codec: Codec, error_feedback: bool = True) -> OuterSync:
    numel = flatten_params(list(net.parameters())).numel()
    transport = LocalGroup(1, codec, numel, timeout_s=JOIN_S).transport(0)
    hyper = OuterHyperparams(inner_steps=1, error_feedback=error_feedback)
    optimizer = SgdOuter(lr=0.7, momentum=0.9, nesterov=True)
    return OuterSync(net.parameters(), transport, codec, optimizer, hyper)


@torch.no_grad()
def local_training(net: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_outer_sync_sends_delta_plus_residual_and_keeps_what_was_lost() -> None:
    """Each round OuterSync encodes delta + residual, steps with the decoded payload and keeps
    residual = target - decoded."""
    codec = build_codec("fp4_e3m0", block_size=4)
    net = model()
    outer = one_island(net, codec)
    assert outer.residual_N is not None and torch.equal(outer.residual_N, torch.zeros(11))
    anchor, momentum, residual = outer.anchor_N.clone(), torch.zeros(11), torch.zeros(11)
    for round in range(3):
        local_training(net, seed=round)
        target = anchor - flatten_params(list(net.parameters())) + residual
        decoded = codec.decode(codec.encode(target), 11)
        residual = target - decoded
        nesterov_step_(anchor, decoded, momentum, lr=0.7, mu=0.9)
        outer.after_inner_step(tokens=1)
        assert torch.equal(outer.residual_N, residual)
        assert torch.equal(outer.anchor_N, anchor)
    assert residual.abs().sum() > 0  # fp4 really lost something


def test_without_error_feedback_there_is_no_residual() -> None:
    outer = one_island(model(), build_codec("int8"), error_feedback=False)
    assert outer.residual_N is None
    assert "residual" not in outer.state_dict()


def test_state_dict_round_trip_includes_the_residual() -> None:
    codec = build_codec("topk", block_size=4, topk_fraction=0.25)
    net = model()
    outer = one_island(net, codec)
    for round in range(2):
        local_training(net, seed=round)
        outer.after_inner_step(tokens=1)
    state = copy.deepcopy(outer.state_dict())
    assert outer.residual_N is not None and outer.residual_N.abs().sum() > 0
    assert torch.equal(state["residual"], outer.residual_N)

    other = one_island(model(), codec)
    other.load_state_dict(state)
    assert other.residual_N is not None and torch.equal(other.residual_N, outer.residual_N)
    assert torch.equal(other.anchor_N, outer.anchor_N) and other.round == 2


def test_a_checkpoint_without_residual_loads_as_zeros() -> None:
    """Checkpoints written before error feedback existed (or with it off) still load."""
    outer = one_island(model(), build_codec("int8"))
    assert outer.residual_N is not None
    outer.residual_N.fill_(1.0)
    old = {
        "anchor": outer.anchor_N.clone(),
        "outer_state": {"momentum": torch.zeros(11)},
        "round": 3,
    }
    outer.load_state_dict(old)
    assert torch.equal(outer.residual_N, torch.zeros(11)) and outer.round == 3


def test_a_residual_of_another_size_is_refused() -> None:
    outer = one_island(model(), build_codec("int8"))
    with pytest.raises(ValueError, match="checkpoint residual holds 3 elements, the model has 11"):
        outer.load_residual(torch.zeros(3))


def test_a_residual_is_dropped_with_a_warning_when_error_feedback_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outer = one_island(model(), build_codec("int8"), error_feedback=False)
    with caplog.at_level(logging.WARNING, logger="diloco.outer.sync"):
        outer.load_residual(torch.zeros(11))
    assert outer.residual_N is None
    assert "holds an error-feedback residual; it is dropped" in caplog.text


def test_warns_that_error_feedback_does_nothing_with_codec_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="diloco.outer.sync"):
        one_island(model(), NoneCodec())
    assert "error feedback has no effect with codec none" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diloco.outer.sync"):
        one_island(model(), build_codec("int8"))
    assert caplog.text == ""


def test_decay_scales_the_residual_before_it_is_added() -> None:
    """beta < 1 forgets part of the residual (SparseLoCo's decayed error feedback); beta = 1 is
    the classic sum."""
    delta = torch.tensor([1.0, -2.0, 0.5])
    residual = torch.tensor([0.4, 0.2, -1.0])
    assert torch.equal(compensate(delta, residual), delta + residual)
    torch.testing.assert_close(
        compensate(delta, residual, decay=0.5), torch.tensor([1.2, -1.9, 0.0])
    )
    assert torch.equal(compensate(delta, residual, decay=0.0), delta)
