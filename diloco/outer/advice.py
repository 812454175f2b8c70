"""Regime advice: one line when a configuration sits where DiLoCo trails DDP badly.

DiLoCo (https://arxiv.org/abs/2311.08105) matches data-parallel training only in some regimes.
The regime map measured on the demo's GPT (docs/results/regime.md, examples/regime.py) found
the gap to an lr-tuned DDP-equivalent at equal tokens set mostly by the tokens each island
steps on: on a few hundred tokens per step every AdamW step is noisy, each island's step along
the true gradient is up to sqrt(k) shorter than DDP's k-times-batch step, and averaging removes
the noise without restoring the length; on thousands of tokens the islands agree and the gap
closes. A synchronous warm phase (`outer.warmup_rounds`) spends bytes to cover the early,
fast-falling phase where the gap opens. At H = 1 the plain mean of k AdamW updates is the
sqrt(k)-short step itself, which an outer lr of about sqrt(k) restores.

Pure: plain numbers in, a line or None out. The CLI prints it once at start.
"""

from __future__ import annotations

import math

# Thresholds from docs/results/regime.md, each figure from a run named there (demo GPT, 0.83M
# parameters, inner lr from {1x, 2x}, DDP-equivalent = one process with k x the batch).
SMALL_STEP_TOKENS = 4096
"""Below this many tokens per island step, DiLoCo with H > 1 and no warm phase trailed the
DDP-equivalent by more than 5 %: the map (128-1,024 tokens, k = 2 and 4, H = 10 and 50, 100
steps, the paper's 0.7 / 0.9: +6.5 to +14.5 %, worse than one island alone in every cell),
512 tokens (k = 4, H = 50, 400 steps: +18.2 %, run a0-paper) and 2,048 tokens (k = 4, H = 20,
200 steps: +7.6 %, run z-d20-mw2); at 4,096 tokens (k = 4, H = 20, 100 steps) it was between
-1.8 % and +2.5 % (runs y-d20-*)."""
MIN_WARM_SHARE = 0.25
"""The share of inner steps in the synchronous warm phase that took the small-step gap from
+18.2 % to +10.9 % (a quarter, run a1-w100) and +8.0 % (a half, run x-d50-w200-mw2); k = 4,
H = 50, 512 tokens per step, 400 steps."""
WARM_LR_LOW = 1.0
"""The low end of the warm phase's lr (the high end: sqrt(k)). sqrt(k) was the better on the
demo's 8 x 128-token steps (k = 4: 2.0798 against 2.1311 at 1.0, runs demo-warm and
demo-warm-lr1), 1.0 on 64 x 16-token steps (k = 4, H = 10 / 50: +5.7 / +2.1 % against
+12.6 / +9.8 % at sqrt(k); runs hyp-b64-k4-h*-wlr1, b64-k4-h*-tuned-lr1): the map cannot tell
which from the tokens per step alone."""
H1_MIN_LR_PER_SQRT_K = 0.75
"""At H = 1 without momentum, an outer lr below this share of sqrt(k) leaves the mean of the
islands' AdamW updates short (issue 15's table, k = 4, 1,024 tokens: lr 1 +6.6 %, lr 2 = sqrt(4)
-1.3 %). With the paper's momentum 0.9 at H = 1 the map's cells were its worst (128 tokens: k = 2
+25.3 %, k = 4 +17.9 %; 1,024 tokens: +40.3 % and +38.1 %; runs b8-k*-h1-paper-lr1,
b64-k*-h1-paper-lr1)."""


def regime_warning(
    *,
    tokens_per_step: int,
    inner_steps: int,
    islands: int,
    rounds: int,
    warmup_rounds: int = 0,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
) -> str | None:
    """The advice line for one configuration, or None where the map found no large gap.

    Args:
        tokens_per_step: tokens one island trains on per inner step (data.batch_size x
            data.seq_len x inner.grad_accum x the island's ranks).
        inner_steps: H (outer.inner_steps).
        islands: k (transport.islands).
        rounds: outer.rounds, the warm phase included.
        warmup_rounds: outer.warmup_rounds (one inner step each).
        outer_lr: outer.lr.
        outer_momentum: outer.momentum.

    Returns:
        One line naming the key to change, or None.
    """
    if islands < 2 or rounds <= warmup_rounds:
        return None
    if inner_steps == 1:
        return _h1_warning(islands, outer_lr, outer_momentum)
    total_steps = warmup_rounds + (rounds - warmup_rounds) * inner_steps
    warm_share = warmup_rounds / total_steps
    if tokens_per_step >= SMALL_STEP_TOKENS or warm_share >= MIN_WARM_SHARE:
        return None
    suggested = math.ceil(MIN_WARM_SHARE * total_steps)
    return (
        f"regime: {islands} islands stepping on {tokens_per_step:,} tokens with H = "
        f"{inner_steps} trailed the DDP-equivalent by 6-18 % in docs/results/regime.md; "
        f"set outer.warmup_rounds to about {suggested} (a quarter of the steps) with "
        f"outer.warmup_lr between {WARM_LR_LOW:g} and {math.sqrt(islands):.2g}, "
        f"or raise data.batch_size "
        f"{math.ceil(SMALL_STEP_TOKENS / tokens_per_step)}x"
    )


def _h1_warning(islands: int, outer_lr: float, outer_momentum: float) -> str | None:
    """H = 1: the mean of the islands' AdamW updates is about sqrt(k) short of DDP's step, and
    an outer momentum on top of AdamW compounds on every step."""
    target = math.sqrt(islands)
    if outer_momentum == 0 and outer_lr >= H1_MIN_LR_PER_SQRT_K * target:
        return None
    return (
        f"regime: with H = 1 the mean of {islands} islands' AdamW updates is about sqrt(k) "
        f"shorter than DDP's step and outer momentum overshoots every step; set outer.lr to "
        f"about {target:.2g} and outer.momentum to 0 (outer.lr {outer_lr:g}, momentum "
        f"{outer_momentum:g} trailed DDP in docs/results/regime.md)"
    )
