"""The outer step `nesterov_step_`: checked against torch.optim.SGD, by hand, and a golden file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from diloco.outer import nesterov_step_

FIXTURE = Path(__file__).parent.parent / "fixtures" / "nesterov_trajectory.json"


def _sgd_trajectory(
    anchor: torch.Tensor, deltas: list[torch.Tensor], *, lr: float, mu: float, nesterov: bool
) -> list[torch.Tensor]:
    """The anchors torch.optim.SGD produces when each delta is given as the gradient."""
    param = torch.nn.Parameter(anchor.clone())
    sgd = torch.optim.SGD([param], lr=lr, momentum=mu, nesterov=nesterov, dampening=0.0)
    anchors = []
    for delta in deltas:
        param.grad = delta.clone()
        sgd.step()
        anchors.append(param.detach().clone())
    return anchors


def _our_trajectory(
    anchor: torch.Tensor, deltas: list[torch.Tensor], *, lr: float, mu: float, nesterov: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    anchor = anchor.clone()
    momentum = torch.zeros_like(anchor)
    anchors = []
    for delta in deltas:
        nesterov_step_(anchor, delta, momentum, lr=lr, mu=mu, nesterov=nesterov)
        anchors.append(anchor.clone())
    return anchors, momentum


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("lr,mu", [(0.7, 0.9), (1.0, 0.5), (0.1, 0.99)])
def test_matches_torch_sgd_bit_for_bit(nesterov: bool, lr: float, mu: float) -> None:
    """Same operation order as SGD(momentum, dampening=0): every anchor is bit-identical."""
    gen = torch.Generator().manual_seed(1)
    anchor = torch.randn(37, generator=gen)
    deltas = [torch.randn(37, generator=gen) * 0.1 for _ in range(6)]

    ours, _ = _our_trajectory(anchor, deltas, lr=lr, mu=mu, nesterov=nesterov)
    reference = _sgd_trajectory(anchor, deltas, lr=lr, mu=mu, nesterov=nesterov)

    for step, (got, want) in enumerate(zip(ours, reference, strict=True)):
        assert torch.equal(got, want), f"step {step} differs from torch.optim.SGD"


@pytest.mark.parametrize("nesterov", [True, False])
def test_zero_momentum_is_plain_sgd_and_leaves_buffer(nesterov: bool) -> None:
    """mu = 0: anchor -= lr * delta, as SGD without momentum; the buffer is not touched."""
    gen = torch.Generator().manual_seed(2)
    anchor = torch.randn(11, generator=gen)
    deltas = [torch.randn(11, generator=gen) for _ in range(3)]

    ours, momentum = _our_trajectory(anchor, deltas, lr=0.7, mu=0.0, nesterov=nesterov)
    # SGD refuses nesterov without momentum; with mu = 0 both flavours are the same update.
    reference = _sgd_trajectory(anchor, deltas, lr=0.7, mu=0.0, nesterov=False)

    for got, want in zip(ours, reference, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(momentum, torch.zeros(11))


def test_hand_computed_three_rounds() -> None:
    """lr 0.7, mu 0.9, Nesterov on a 2-vector; expected values worked out by hand from
    buf = mu * buf + g;  anchor -= lr * (g + mu * buf)."""
    deltas = [[0.5, 0.25], [-0.25, 0.5], [0.125, -0.375]]
    expected_anchor = [
        # buf = [0.5, 0.25]; update = [0.5 + 0.45, 0.25 + 0.225] = [0.95, 0.475]
        # anchor = [1 - 0.665, -2 - 0.3325]
        [0.335, -2.3325],
        # buf = [0.45 - 0.25, 0.225 + 0.5] = [0.2, 0.725]; update = [-0.07, 1.1525]
        # anchor = [0.335 + 0.049, -2.3325 - 0.80675]
        [0.384, -3.13925],
        # buf = [0.18 + 0.125, 0.6525 - 0.375] = [0.305, 0.2775]; update = [0.3995, -0.12525]
        # anchor = [0.384 - 0.27965, -3.13925 + 0.087675]
        [0.10435, -3.051575],
    ]
    expected_momentum = [[0.5, 0.25], [0.2, 0.725], [0.305, 0.2775]]

    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-6)]:
        anchor = torch.tensor([1.0, -2.0], dtype=dtype)
        momentum = torch.zeros(2, dtype=dtype)
        for delta, want_anchor, want_momentum in zip(
            deltas, expected_anchor, expected_momentum, strict=True
        ):
            nesterov_step_(anchor, torch.tensor(delta, dtype=dtype), momentum, lr=0.7, mu=0.9)
            torch.testing.assert_close(
                anchor, torch.tensor(want_anchor, dtype=dtype), rtol=0, atol=tol
            )
            torch.testing.assert_close(
                momentum, torch.tensor(want_momentum, dtype=dtype), rtol=0, atol=tol
            )


def _golden_inputs() -> tuple[torch.Tensor, list[torch.Tensor]]:
    # From a formula, not an RNG, so the inputs do not move with torch versions.
    anchor = torch.tensor([math.sin(i + 1.0) for i in range(8)], dtype=torch.float32)
    deltas = [
        torch.tensor([0.1 * math.cos(3.0 * r + i) for i in range(8)], dtype=torch.float32)
        for r in range(5)
    ]
    return anchor, deltas


def _golden_trajectories() -> dict[str, list[list[float]]]:
    anchor, deltas = _golden_inputs()
    out = {}
    for nesterov in (True, False):
        anchors, _ = _our_trajectory(anchor, deltas, lr=0.7, mu=0.9, nesterov=nesterov)
        out["nesterov" if nesterov else "heavy_ball"] = [a.tolist() for a in anchors]
    return out


def test_golden_trajectory() -> None:
    """Five outer steps (lr 0.7, mu 0.9) match tests/fixtures/nesterov_trajectory.json.

    Rewrite the file only on purpose: WRITE_FIXTURE=1 pytest tests/unit/test_nesterov.py
    """
    got = _golden_trajectories()
    if os.environ.get("WRITE_FIXTURE") == "1":
        FIXTURE.write_text(json.dumps({"lr": 0.7, "mu": 0.9, **got}, indent=1) + "\n")
    assert FIXTURE.is_file(), f"{FIXTURE} is missing: run with WRITE_FIXTURE=1 to create it"
    golden = json.loads(FIXTURE.read_text())
    assert (golden["lr"], golden["mu"]) == (0.7, 0.9)
    for name in ("nesterov", "heavy_ball"):
        assert len(golden[name]) == 5
        torch.testing.assert_close(
            torch.tensor(got[name]), torch.tensor(golden[name]), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_step_over_several_chunks_matches_torch_sgd_bit_for_bit(
    threads: int, nesterov: bool
) -> None:
    """Past STEP_CHUNK elements the step runs chunk by chunk (no N-sized temporary); every
    element still comes out as torch.optim.SGD's, whatever the thread count, with Nesterov
    momentum and with heavy ball."""
    from diloco.outer.nesterov import STEP_CHUNK

    numel = 2 * STEP_CHUNK + 12_345  # a ragged last chunk
    gen = torch.Generator().manual_seed(3)
    anchor = torch.randn(numel, generator=gen)
    deltas = [torch.randn(numel, generator=gen) * 0.1 for _ in range(3)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, _ = _our_trajectory(anchor, deltas, lr=0.7, mu=0.9, nesterov=nesterov)
        reference = _sgd_trajectory(anchor, deltas, lr=0.7, mu=0.9, nesterov=nesterov)
    finally:
        torch.set_num_threads(before)
    for step, (got, want) in enumerate(zip(ours, reference, strict=True)):
        assert torch.equal(got, want), f"step {step} differs from torch.optim.SGD"
