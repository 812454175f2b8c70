"""Junk sequences mixed into a clean stream, so that what data selection does can be measured.

With `data.noise = p`, each training sequence is replaced, with probability p, by one of three
kinds of junk (a third each): random tokens (nothing to learn), the window's own tokens
shuffled (the unigram statistics of real text, no order) or a short fragment of it repeated to
the full length (trivial to predict once seen, useless for text). Validation stays clean. Each
batch says which rows are junk (`Batch.noisy`), so the metrics can report how much of it a
selector kept.

Shape legend: B sequences, T1 tokens per window (seq_len + 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diloco.data.base import Batch, DataSource

NOISE_KINDS = ("random", "shuffled", "repeated")
FRAGMENT_TOKENS = (4, 16)
"""Length range of a repeated fragment: short enough to be obvious repetition."""


def junk(
    window_T1: torch.Tensor, kind: str, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """A junk window of the same length and dtype as `window_T1`, of one of NOISE_KINDS."""
    length = window_T1.shape[0]
    if kind == "random":
        return torch.randint(0, vocab_size, (length,), generator=generator, dtype=window_T1.dtype)
    if kind == "shuffled":
        return window_T1[torch.randperm(length, generator=generator)]
    if kind == "repeated":
        low, high = FRAGMENT_TOKENS
        size = int(torch.randint(low, high + 1, (), generator=generator))
        start = int(torch.randint(0, max(1, length - size + 1), (), generator=generator))
        fragment = window_T1[start : start + size]
        return fragment.repeat(length // fragment.numel() + 1)[:length].clone()
    raise ValueError(f"unknown noise kind {kind!r}, expected one of {NOISE_KINDS}")


def corrupt(
    tokens_BT1: torch.Tensor, noise: float, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens with a share `noise` of the rows replaced by junk, which rows: bool [B])."""
    rows = tokens_BT1.shape[0]
    noisy_B = torch.rand(rows, generator=generator) < noise
    kinds_B = torch.randint(0, len(NOISE_KINDS), (rows,), generator=generator)
    out_BT1 = tokens_BT1.clone()
    for row in noisy_B.nonzero().flatten().tolist():
        out_BT1[row] = junk(tokens_BT1[row], NOISE_KINDS[int(kinds_B[row])], vocab_size, generator)
    return out_BT1, noisy_B


class NoisyWindows:
    """A `DataSource` that corrupts a share `noise` of another source's training sequences.

    The clean source draws exactly what it would without noise (the junk has its own
    generator), so runs with and without noise see the same clean windows.
    """

    def __init__(
        self, source: DataSource, *, noise: float, vocab_size: int, seed: int, island: int
    ):
        self.source = source
        self.noise = noise
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed * 65_537 + island + 7_919)

    def next_batch(self) -> Batch:
        batch = self.source.next_batch()
        tokens_BT1, noisy_B = corrupt(batch.inputs, self.noise, self.vocab_size, self.generator)
        return Batch(tokens_BT1, batch.num_tokens, noisy_B)

    def val_batches(self, count: int) -> Sequence[Batch]:
        return self.source.val_batches(count)

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "noise_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self.generator.set_state(state["noise_generator"])
