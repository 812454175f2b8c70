"""TokenWindows: each island's random windows over its own shard, shared validation windows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from diloco.data import TokenWindows

B, T = 4, 8


def windows(
    island: int = 0,
    num_islands: int = 3,
    *,
    train: np.ndarray | None = None,
    val: np.ndarray | None = None,
    seed: int = 0,
    vocab_size: int = 10_000,
) -> TokenWindows:
    """Token i of the training array is the id i, so a window shows where it was cut."""
    return TokenWindows(
        np.arange(3000, dtype=np.uint16) if train is None else train,
        np.arange(5000, 5200, dtype=np.uint16) if val is None else val,
        batch_size=B,
        seq_len=T,
        island=island,
        num_islands=num_islands,
        seed=seed,
        vocab_size=vocab_size,
    )


def test_batches_are_contiguous_windows_of_the_right_shape() -> None:
    """A batch is B windows of T + 1 consecutive tokens, int64, counting B * T tokens."""
    batch = windows().next_batch()
    assert batch.inputs.shape == (B, T + 1) and batch.inputs.dtype == torch.int64
    assert batch.num_tokens == B * T
    steps = batch.inputs[:, 1:] - batch.inputs[:, :-1]
    assert torch.equal(steps, torch.ones(B, T, dtype=torch.int64))


def test_shards_are_disjoint_and_cover_the_training_tokens() -> None:
    """Island i reads only tokens [i N / k, (i + 1) N / k): no token is seen by two islands."""
    seen = []
    for island in range(3):
        source = windows(island)
        tokens = torch.cat([source.next_batch().inputs.flatten() for _ in range(20)])
        assert int(tokens.min()) >= 1000 * island
        assert int(tokens.max()) < 1000 * (island + 1)
        assert np.array_equal(source.shard, np.arange(1000 * island, 1000 * (island + 1)))
        seen.append(set(tokens.tolist()))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_deterministic_for_a_seed() -> None:
    """Same seed and island: the same batches; another seed: other batches."""
    a, b, c = windows(seed=7), windows(seed=7), windows(seed=8)
    batches_a = [a.next_batch().inputs for _ in range(3)]
    batches_b = [b.next_batch().inputs for _ in range(3)]
    batches_c = [c.next_batch().inputs for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(batches_a, batches_c, strict=True))


def test_islands_draw_different_positions() -> None:
    """Each island's generator mixes in its index: offsets within the shards differ."""
    offsets = [windows(island).next_batch().inputs[:, 0] - 1000 * island for island in range(3)]
    assert not torch.equal(offsets[0], offsets[1])
    assert not torch.equal(offsets[1], offsets[2])


def test_state_dict_resumes_the_same_next_batches() -> None:
    """A stream restored from its state (through torch.save, as a checkpoint does) continues
    with exactly the batches the original draws next."""
    source = windows(1)
    for _ in range(3):
        source.next_batch()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    expected = [source.next_batch().inputs for _ in range(4)]

    restored = windows(1)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert restored.batches_drawn == 3
    got = [restored.next_batch().inputs for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))
    assert restored.batches_drawn == source.batches_drawn == 7


def test_val_batches_identical_across_islands_and_calls() -> None:
    """Every island evaluates on the same windows, every time, whatever it drew before."""
    first, second = windows(0), windows(2)
    second.next_batch()
    a, b, c = first.val_batches(3), second.val_batches(3), first.val_batches(3)
    assert len(a) == 3
    for x, y, z in zip(a, b, c, strict=True):
        assert x.inputs.shape == (B, T + 1) and x.num_tokens == B * T
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.inputs, z.inputs)


def test_val_windows_are_evenly_spaced_over_the_whole_split() -> None:
    """Validation windows start at the first token and end at the last one."""
    batches = windows().val_batches(2)
    starts = torch.cat([b.inputs[:, 0] for b in batches])
    assert int(starts[0]) == 5000
    assert int(batches[-1].inputs[-1, -1]) == 5199
    assert bool((starts[1:] > starts[:-1]).all())


def test_exactly_one_window_is_enough() -> None:
    """A shard or val split of exactly T + 1 tokens holds one window and is accepted."""
    source = windows(num_islands=1, train=np.arange(T + 1, dtype=np.uint16), val=np.arange(T + 1))
    assert torch.equal(source.next_batch().inputs, torch.arange(T + 1).repeat(B, 1))
    assert torch.equal(source.val_batches(1)[0].inputs, torch.arange(T + 1).repeat(B, 1))


def test_too_short_shard_is_refused() -> None:
    """A shard shorter than one window names the island, the sizes and the way out."""
    with pytest.raises(ValueError, match=r"island 2's shard has 8 tokens, fewer than one window"):
        windows(2, train=np.arange(3 * T, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"data.seq_len \+ 1 = 9; use more data or fewer islands"):
        windows(2, train=np.arange(3 * T, dtype=np.uint16))


def test_too_short_val_is_refused() -> None:
    """A validation split shorter than one window names data.val_fraction."""
    with pytest.raises(ValueError, match=r"validation split has 8 tokens.*data.val_fraction"):
        windows(val=np.arange(T, dtype=np.uint16))


def test_out_of_vocab_tokens_are_refused() -> None:
    """A token id the model cannot embed is refused naming model.vocab_size."""
    source = windows(
        train=np.full(3000, 300, dtype=np.uint16),
        val=np.full(100, 299, dtype=np.uint16),
        vocab_size=256,
    )
    with pytest.raises(ValueError, match=r"token id 300 is outside model.vocab_size=256"):
        source.next_batch()
    with pytest.raises(ValueError, match=r"token id 299 is outside model.vocab_size=256"):
        source.val_batches(1)
