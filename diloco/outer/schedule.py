"""The outer loop over time: how many inner steps each round has, and the outer learning rate
and momentum of each round. Pure functions of the round index.

- A **synchronous warm phase** (`outer.warmup_rounds`): the first rounds have one inner step
  each and apply the mean with plain SGD at `outer.warmup_lr` (no momentum), which tracks
  data-parallel training while the loss falls fast, the phase where DiLoCo loses the most
  (docs/results/regime.md). The DiLoCo paper starts from a pretrained model instead; this is
  that warm start inside one run.
- **Outer momentum warm-up** (`outer.momentum_warmup_rounds`): mu ramps from 0 to
  `outer.momentum`, so the first rounds' noisy means are not amplified (the overshoot seen in
  rounds 2-3 of the demo).
- **Outer lr schedule** (`outer.lr_schedule`): constant (the paper: decaying it gave nothing) or
  cosine to `outer.lr * outer.min_lr_ratio` over the main rounds.

Main-round indices count from the end of the warm phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class OuterSchedule:
    rounds: int
    """All rounds of the run, the warm phase included."""
    inner_steps: int
    """H of a main round."""
    warmup_rounds: int = 0
    """Rounds of one inner step at the start (the synchronous warm phase)."""
    warmup_lr: float = 1.0
    """The plain-SGD outer lr of a warm-phase round."""
    lr: float = 0.7
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    momentum: float = 0.9
    momentum_warmup_rounds: int = 0

    def is_warm(self, round: int) -> bool:
        return round < self.warmup_rounds

    def steps_in_round(self, round: int) -> int:
        return 1 if self.is_warm(round) else self.inner_steps

    def total_steps(self) -> int:
        """Inner steps of the whole run (the inner learning rate's cosine spans them)."""
        warm = min(self.warmup_rounds, self.rounds)
        return warm + (self.rounds - warm) * self.inner_steps

    def steps_before(self, round: int) -> int:
        """Inner steps taken before `round` starts."""
        warm = min(self.warmup_rounds, round)
        return warm + max(0, round - self.warmup_rounds) * self.inner_steps

    def lr_at(self, round: int) -> float:
        """The outer learning rate of `round` (a warm round's is `warmup_lr`)."""
        if self.is_warm(round):
            return self.warmup_lr
        if self.lr_schedule == "constant":
            return self.lr
        main = self.rounds - self.warmup_rounds
        progress = (round - self.warmup_rounds) / max(1, main - 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)

    def momentum_at(self, round: int) -> float:
        """The outer momentum of `round`: 0 in the warm phase, then ramped up."""
        if self.is_warm(round):
            return 0.0
        main_round = round - self.warmup_rounds
        if main_round >= self.momentum_warmup_rounds:
            return self.momentum
        return self.momentum * main_round / self.momentum_warmup_rounds
