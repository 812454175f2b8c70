"""ChunkedAdamW: torch's CPU AdamW a slice at a time, the same bits with smaller temporaries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from diloco.inner import InnerTrainer, chunked_adamw
from diloco.inner.chunked_adamw import ChunkedAdamW
from diloco.inner.config import InnerConfig

Optimizer = Callable[..., torch.optim.Optimizer]
SLICE = 1000  # not a multiple of any SIMD width: slices end mid-vector


@pytest.fixture
def short_slices(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(chunked_adamw, "CHUNK_NUMEL", SLICE)
    yield SLICE


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def parameters(shapes: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]


def train(
    make: Optimizer, params: list[torch.nn.Parameter], steps: int = 6, **settings: Any
) -> torch.optim.Optimizer:
    """`steps` steps on seeded random gradients; two groups, as the inner loop makes them."""
    optimizer = make(
        [
            {"params": params[: len(params) // 2 or 1], "weight_decay": 0.1},
            {"params": params[len(params) // 2 or 1 :], "weight_decay": 0.0},
        ],
        lr=3e-3,
        betas=(0.9, 0.95),
        **settings,
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) * 0.1
        optimizer.step()
    return optimizer


def assert_same_state(ours: torch.optim.Optimizer, torchs: torch.optim.Optimizer) -> None:
    mine, theirs = ours.state_dict()["state"], torchs.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for index, state in theirs.items():
        assert mine[index].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(mine[index][key], value), (index, key)


SHAPES = [
    [(SLICE - 1,), (SLICE,), (SLICE + 1,)],
    [(3 * SLICE,), (7, 1001), (64, 63), (5,)],
    [(40, 999), (2 * SLICE + 17,)],
]


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("shapes", SHAPES)
def test_the_same_bits_as_torchs_adamw(
    short_slices: int,
    threads: None,
    num_threads: int,
    amsgrad: bool,
    shapes: list[tuple[int, ...]],
) -> None:
    """Parameters of one slice, one value over, several slices and a remainder, with and
    without weight decay and amsgrad, on one and two threads: every parameter and every state
    tensor equal to torch.optim.AdamW's, bit for bit, after six steps."""
    torch.set_num_threads(num_threads)
    ours, torchs = parameters(shapes), parameters(shapes)
    chunked = train(ChunkedAdamW, ours, amsgrad=amsgrad)
    plain = train(torch.optim.AdamW, torchs, amsgrad=amsgrad)
    for mine, theirs, start in zip(ours, torchs, parameters(shapes), strict=True):
        assert torch.equal(mine, theirs)
        assert not torch.equal(mine, start)  # the steps moved it
    assert_same_state(chunked, plain)


def test_the_step_count_moves_once_a_step(short_slices: int) -> None:
    """A parameter of five slices: its state's step is the number of steps taken, not five
    times it (each slice's bias corrections use the same count)."""
    params = parameters([(5 * SLICE,)])
    optimizer = train(ChunkedAdamW, params, steps=3)
    assert optimizer.state[params[0]]["step"].item() == 3.0


def test_checkpoints_move_between_it_and_torchs(short_slices: int) -> None:
    """A state saved by ChunkedAdamW continues in torch.optim.AdamW, and the other way round,
    to the same bits as an unbroken run."""
    shapes = [(3 * SLICE + 5,), (11, 13)]
    unbroken = parameters(shapes)
    train(torch.optim.AdamW, unbroken, steps=6)
    for first, second in ((ChunkedAdamW, torch.optim.AdamW), (torch.optim.AdamW, ChunkedAdamW)):
        params = parameters(shapes)
        saved = train(first, params, steps=3).state_dict()
        resumed = train(second, params, steps=0)
        resumed.load_state_dict(saved)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):  # the first three steps' gradients, drawn and dropped
            for param in params:
                torch.randn(param.shape, generator=generator)
        for _ in range(3):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator) * 0.1
            resumed.step()
        for mine, theirs in zip(params, unbroken, strict=True):
            assert torch.equal(mine, theirs), (first.__name__, second.__name__)


def test_a_parameter_it_cannot_slice_is_stepped_whole(short_slices: int) -> None:
    """A transposed (non-contiguous) parameter is stepped as torch steps it: the same bits."""
    start = torch.randn(60, 50)
    ours = [torch.nn.Parameter(start.clone().t()), *parameters([(2 * SLICE,)])]
    torchs = [torch.nn.Parameter(start.clone().t()), *parameters([(2 * SLICE,)])]
    assert not ours[0].is_contiguous() and not torchs[0].is_contiguous()
    train(ChunkedAdamW, ours)
    train(torch.optim.AdamW, torchs)
    for mine, theirs in zip(ours, torchs, strict=True):
        assert torch.equal(mine, theirs)


def largest_allocation(make: Optimizer, numel: int) -> int:
    """Bytes of the largest tensor any operation of one step allocates (the second step:
    the first also allocates the two moments)."""
    param = torch.nn.Parameter(torch.randn(numel))
    param.grad = torch.randn(numel)
    optimizer = make([param])
    optimizer.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        optimizer.step()
    return max(event.self_cpu_memory_usage for event in recorded.events())


def test_no_temporary_is_larger_than_a_slice() -> None:
    """torch's step allocates two temporaries of the parameter's size (12 MB for 3M values);
    ChunkedAdamW's largest is one slice (4 MiB), whatever the parameter's size."""
    numel = 3_000_000
    assert largest_allocation(torch.optim.AdamW, numel) >= 4 * numel
    assert largest_allocation(ChunkedAdamW, numel) <= 4 * chunked_adamw.CHUNK_NUMEL


def test_the_inner_loop_steps_with_it_on_a_cpu() -> None:
    model = torch.nn.Linear(4, 2)
    trainer = InnerTrainer(model, InnerConfig(), total_steps=1, device=torch.device("cpu"))
    assert isinstance(trainer.optimizer, ChunkedAdamW)
