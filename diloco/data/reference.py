"""JEST's reference model: loaded from a checkpoint, or trained first on clean data, then frozen.

The reference stands for "what a model that has seen clean data finds easy" (the irreducible
loss of RHO-LOSS, arXiv 2206.07137). It may be smaller than the learner: it only scores.
Its training is counted in FLOPs, so that a comparison with uniform sampling pays for it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from diloco.data.corpus import load_stdlib_corpus
from diloco.data.selectors.jest_config import ReferenceConfig
from diloco.data.token_files import read_text_tokens
from diloco.data.windows import TokenWindows
from diloco.errors import ConfigError
from diloco.inner.config import InnerConfig
from diloco.inner.trainer import InnerTrainer
from diloco.models.build import build_model
from diloco.models.flops import train_flops_per_token
from diloco.models.weights import load_weights_

if TYPE_CHECKING:
    from diloco.data.config import DataConfig
    from diloco.models.config import ModelConfig

log = logging.getLogger(__name__)
KEY = "data.selector.reference"


def reference_model_config(model: ModelConfig, reference: ReferenceConfig) -> ModelConfig:
    """The learner's model config with the reference's sizes (0: the learner's)."""
    n_head = reference.n_head or model.n_head
    d_model = reference.d_model or model.d_model
    if d_model % n_head:
        raise ConfigError(
            f"{KEY}.d_model must be a multiple of the reference's n_head={n_head}, got {d_model}"
        )
    return dataclasses.replace(
        model, n_layer=reference.n_layer or model.n_layer, n_head=n_head, d_model=d_model
    )


def load_reference_(model: nn.Module, path: str) -> None:
    """Load a diloco checkpoint's shared parameters, or a state_dict, into `model` (nothing is
    unpickled: `diloco/models/weights.py`).

    Raises:
        ConfigError: the file is missing, unreadable or does not fit the reference model.
    """
    load_weights_(model, path, key=f"{KEY}.checkpoint")


def clean_source(data: DataConfig, seed: int, vocab_size: int) -> TokenWindows:
    """Random windows of the clean dataset the reference trains on (never the val split)."""
    name = data.selector.reference.data
    if name == "stdlib":
        try:
            train, _ = load_stdlib_corpus(data.val_fraction)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"{KEY}.data stdlib: {error}") from None
    elif Path(name).is_file():
        train = read_text_tokens(name)
    else:
        raise ConfigError(f"{KEY}.data must be stdlib or an existing text file, got {name!r}")
    try:
        # Its own seed: the reference's windows are not the learner's first batches.
        return TokenWindows(
            train,
            train,
            batch_size=data.batch_size,
            seq_len=data.seq_len,
            island=0,
            num_islands=1,
            seed=seed + 104_729,
            vocab_size=vocab_size,
        )
    except ValueError as error:
        raise ConfigError(f"{KEY}.data: {error}") from None


def train_reference_(
    model: nn.Module,
    source: TokenWindows,
    config: ReferenceConfig,
    device: torch.device,
    bf16: bool,
) -> int:
    """Train `model` for config.train_steps AdamW steps on `source`; returns the FLOPs spent."""
    inner = InnerConfig(lr=config.lr, warmup_steps=max(1, config.train_steps // 10))
    trainer = InnerTrainer(model, inner, config.train_steps, device, bf16)
    tokens = 0
    for _ in range(config.train_steps):
        batch = source.next_batch()
        trainer.train_step(batch.inputs)
        tokens += batch.num_tokens
    return tokens * train_flops_per_token(model)


def build_reference(
    data: DataConfig, model: ModelConfig, *, device: torch.device, bf16: bool, seed: int
) -> tuple[nn.Module, int]:
    """(the frozen reference model on `device`, the FLOPs its training cost)."""
    reference_config = data.selector.reference
    # Its own initial weights (not a copy of the learner's), without moving the global RNG
    # that the learner's runtime relies on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        reference = build_model(
            reference_model_config(model, reference_config), context=data.seq_len
        )
    flops = 0
    if reference_config.checkpoint:
        load_reference_(reference, reference_config.checkpoint)
        reference.to(device)
    else:
        reference.to(device)
        source = clean_source(data, seed, model.vocab_size)
        flops = train_reference_(reference, source, reference_config, device, bf16)
        log.info(
            "reference model trained for %d steps on %s (%.3g FLOPs)",
            reference_config.train_steps,
            reference_config.data,
            flops,
        )
    reference.eval()
    reference.requires_grad_(False)  # frozen: nothing may train it by accident
    return reference, flops
