"""The regime advice for one run's config (diloco/outer/advice.py, docs/results/regime.md):
printed once when the run starts, kept in summary.json and shown in the final summary, so that
a run where DiLoCo is known to trail DDP says so and names the key to change."""

from __future__ import annotations

from diloco.config import IslandConfig
from diloco.outer.advice import regime_warning


def regime_advice(config: IslandConfig, ranks_per_island: int) -> str | None:
    """The advice line, or None where the map saw no large gap (or measured nothing: the map
    covers the SGD / Nesterov outer step only)."""
    outer = config.outer
    if outer.optimizer != "sgd":
        return None
    data = config.data
    return regime_warning(
        tokens_per_step=data.batch_size * data.seq_len * config.inner.grad_accum * ranks_per_island,
        inner_steps=outer.inner_steps,
        islands=config.transport.islands,
        rounds=outer.rounds,
        warmup_rounds=outer.warmup_rounds,
        outer_lr=outer.step_lr,
        outer_momentum=outer.step_momentum,
    )
