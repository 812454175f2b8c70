"""Selectors: which examples each island's inner loop trains on."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from diloco.config.schema import DataConfig, JestScore, ModelConfig, SelectorConfig, SelectorName
from diloco.data.reference import build_reference
from diloco.data.selectors.base import Selector, SelectorCost
from diloco.data.selectors.jest import JestSelector
from diloco.data.selectors.uniform import UniformSelector

log = logging.getLogger(__name__)

SELECTORS: dict[str, type] = {"uniform": UniformSelector, "jest": JestSelector}


def build_selectors(
    data: DataConfig,
    model: ModelConfig,
    *,
    ranks: Sequence[int],
    device: torch.device,
    bf16: bool,
    seed: int,
) -> list[Selector]:
    """One selector per hosted island; the islands of a process share one frozen reference.

    Raises:
        ConfigError: the reference's checkpoint or clean data cannot be used.
    """
    config = data.selector
    for key in _ignored(config):
        log.warning("data.selector.%s is set but has no effect with this configuration", key)
    if config.name is SelectorName.uniform:
        return [UniformSelector() for _ in ranks]
    reference: torch.nn.Module
    if config.score is JestScore.hard_learner:
        reference, flops = torch.nn.Identity(), 0  # never called: the score needs no reference
    else:
        reference, flops = build_reference(data, model, device=device, bf16=bf16, seed=seed)
    return [
        JestSelector(
            config,
            reference,
            device=device,
            bf16=bf16,
            seed=seed * 1_009 + rank,
            reference_flops=flops,
        )
        for rank in ranks
    ]


def _ignored(config: SelectorConfig) -> list[str]:
    """The selector options that are set but have no effect (STYLE: nothing silent)."""
    default = SelectorConfig()
    changed = [key for key in vars(default) if getattr(config, key) != getattr(default, key)]
    if config.name is SelectorName.uniform:
        return [key for key in changed if key != "name"]
    ignored = []
    if config.score is JestScore.easy_reference and "rescore_every" in changed:
        ignored.append("rescore_every")
    if config.score is JestScore.hard_learner and "reference" in changed:
        ignored.append("reference")
    reference, default_reference = config.reference, default.reference
    if reference.checkpoint:
        ignored += [
            f"reference.{key}"
            for key in ("data", "train_steps", "lr")
            if getattr(reference, key) != getattr(default_reference, key)
        ]
    return ignored


__all__ = [
    "SELECTORS",
    "JestSelector",
    "Selector",
    "SelectorCost",
    "UniformSelector",
    "build_selectors",
]
