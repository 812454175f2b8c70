"""JEST: train on the examples a learner finds hard and a frozen reference model finds easy.

Evans et al. 2024, "Data curation via joint example selection further accelerates multimodal
learning", https://arxiv.org/abs/2406.17711; RHO-LOSS (Mindermann et al. 2022,
https://arxiv.org/abs/2206.07137) keeps the top-k of the same score.

Each step draws a super-batch of S = batch_size / ratio sequences, scores every sequence with
the learner and the reference (no_grad, eval mode, one batched forward each, on the island's
device) and keeps B = batch_size of them.

Why sampling by score is JEST's joint sampling here: JEST scores a sub-batch jointly because a
contrastive loss couples the examples of a batch, and draws it in chunks, each chunk sampled
from softmax(conditional learnability / temperature) given the chunks already drawn. A
language-model loss is per sequence: the learnability of a sub-batch is the sum of its
sequences' learnabilities, so conditioning on earlier chunks changes nothing and the chunked
draw is the same as drawing B sequences without replacement with probabilities
softmax(score / temperature), for any number of chunks. That is what `choose` does, with the
Gumbel-top-k trick (one draw for the whole batch); temperature 0 keeps the B best (RHO-LOSS).

Shape legend: S super-batch sequences, B kept sequences, T tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from diloco.data.base import Batch
from diloco.data.selectors.base import SelectorCost, SelectorSetup
from diloco.data.selectors.jest_config import JestScore
from diloco.inner.trainer import move_to
from diloco.models.gpt import GPT

if TYPE_CHECKING:
    from diloco.data.selectors.config import SelectorConfig


def jest_scores(
    learner_loss_S: torch.Tensor | None, reference_loss_S: torch.Tensor | None, score: JestScore
) -> torch.Tensor | None:
    """Per-sequence scores, higher is kept first; None when there is nothing to rank by.

    A missing learner loss (a step between two learner scorings) drops the learner term:
    learnability then ranks by the reference alone, hard_learner by nothing.
    """
    if score is JestScore.hard_learner:
        return learner_loss_S
    assert reference_loss_S is not None, f"score {score.value} needs the reference's losses"
    if score is JestScore.easy_reference or learner_loss_S is None:
        return -reference_loss_S
    return learner_loss_S - reference_loss_S


def choose(
    scores_S: torch.Tensor | None,
    keep: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices (ascending) of the `keep` sequences to train on.

    Args:
        scores_S: one score per sequence, or None (keep the first `keep`, as uniform would).
        keep: how many to keep (B).
        temperature: 0 keeps the highest scores (ties: the earlier sequence); > 0 samples
            without replacement with probabilities softmax(scores_S / temperature).
        generator: the random source of the sampling (temperature > 0).
    """
    if scores_S is None:
        return torch.arange(keep)
    keys_S = scores_S.detach().double().cpu()
    if temperature > 0:
        # Gumbel-top-k: the top `keep` of score / t + Gumbel noise is a draw without
        # replacement from softmax(score / t) (Kool et al. 2019, arXiv 1903.06059).
        uniform_S = torch.rand(keys_S.shape, generator=generator, dtype=torch.float64)
        uniform_S = uniform_S.clamp_min(torch.finfo(torch.float64).tiny)
        keys_S = keys_S / temperature - torch.log(-torch.log(uniform_S))
    order = torch.argsort(keys_S, descending=True, stable=True)
    return order[:keep].sort().values


def take(inputs: Any, index_B: torch.Tensor) -> Any:
    """The rows `index_B` (dim 0) of `inputs`: a tensor, or lists, tuples and dicts of them."""
    if isinstance(inputs, torch.Tensor):
        return inputs.index_select(0, index_B.to(inputs.device))
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(take(item, index_B) for item in inputs)
    if isinstance(inputs, dict):
        return {key: take(value, index_B) for key, value in inputs.items()}
    raise TypeError(f"jest cannot select rows of {type(inputs).__name__} inputs")


def num_rows(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, (list, tuple)) and inputs:
        return num_rows(inputs[0])
    if isinstance(inputs, dict) and inputs:
        return num_rows(next(iter(inputs.values())))
    raise TypeError(f"jest cannot count the rows of {type(inputs).__name__} inputs")


def forward_flops_per_token(model: nn.Module) -> int:
    """Forward FLOPs per token: a third of the training FLOPs (2 N, plus attention)."""
    flops = getattr(model, "flops_per_token", None)
    if callable(flops):
        return int(flops()) // 3
    return 2 * sum(p.numel() for p in model.parameters())


@torch.no_grad()
def per_sequence_losses(
    model: nn.Module, inputs: Any, device: torch.device, bf16: bool = False
) -> torch.Tensor:
    """fp32 loss of each sequence (row) of `inputs`, on the cpu, in one batched forward.

    The built-in GPT is scored through its logits; another model through its own
    `per_example_loss(inputs) -> [S]` when it has one, else one forward per row (slow).
    """
    was_training = model.training
    model.eval()
    inputs = move_to(inputs, device)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if isinstance(model, GPT):
                logits_STV = model.logits(inputs[:, :-1]).float()
                loss_ST = F.cross_entropy(
                    logits_STV.transpose(1, 2), inputs[:, 1:], reduction="none"
                )
                loss_S = loss_ST.mean(dim=1)
            elif callable(per_example := getattr(model, "per_example_loss", None)):
                loss_S = per_example(inputs)
            else:
                rows = range(num_rows(inputs))
                loss_S = torch.stack([model(take(inputs, torch.tensor([i]))) for i in rows])
    finally:
        model.train(was_training)
    return loss_S.float().cpu()


class JestSelector:
    """Keeps data.batch_size of every super-batch of data.batch_size / ratio sequences.

    Args:
        config: the data.selector section.
        reference: the frozen reference model, on `device` (may be shared by several islands
            of one process: it is only read).
        device: the island's device; bf16: score under bf16 autocast.
        seed: the random source of sampling (temperature > 0), with the island's index.
        reference_flops: what training the reference cost (reported, not spent here).
    """

    def __init__(
        self,
        config: SelectorConfig,
        reference: nn.Module,
        *,
        device: torch.device,
        bf16: bool,
        seed: int,
        reference_flops: int = 0,
    ):
        self.config = config
        self.reference = reference
        self.device = device
        self.bf16 = bf16
        self.seed = seed
        self.super_batch_factor = round(1 / config.ratio)
        self.cost = SelectorCost(reference_flops=reference_flops)
        self.steps = 0

    def select(self, super_batch: Batch, learner: nn.Module) -> Batch:
        begin = time.perf_counter()
        size = num_rows(super_batch.inputs)
        keep = size // self.super_batch_factor
        score = self.config.score
        learner_due = self.steps % self.config.rescore_every == 0
        use_learner = score is not JestScore.easy_reference and learner_due
        use_reference = score is not JestScore.hard_learner
        learner_loss_S = reference_loss_S = None
        if use_learner:
            learner_loss_S = per_sequence_losses(
                learner, super_batch.inputs, self.device, self.bf16
            )
        if use_reference:
            reference_loss_S = per_sequence_losses(
                self.reference, super_batch.inputs, self.device, self.bf16
            )
        scores_S = jest_scores(learner_loss_S, reference_loss_S, score)
        # A generator per step from (seed, step): the draw is reproducible, and a resumed run
        # needs only the step count to continue the same sequence of draws.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps)
        index_B = choose(scores_S, keep, self.config.temperature, generator)
        self.steps += 1
        flops_per_token = forward_flops_per_token(learner) * use_learner + (
            forward_flops_per_token(self.reference) * use_reference
        )
        self.cost.scoring_flops += flops_per_token * super_batch.num_tokens
        self.cost.scoring_s += time.perf_counter() - begin
        noisy = super_batch.noisy
        return Batch(
            take(super_batch.inputs, index_B),
            super_batch.num_tokens * keep // size,
            None if noisy is None else noisy[index_B],
        )

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "cost": vars(self.cost).copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a checkpoint written before selectors had state
            return
        self.steps = int(state["steps"])
        self.cost = SelectorCost(**state["cost"])


def build_jest_selectors(setup: SelectorSetup) -> list[JestSelector]:
    """One JEST selector per hosted island, sharing one frozen reference model."""
    from diloco.data.reference import build_reference

    config = setup.data.selector
    reference: nn.Module
    if config.score is JestScore.hard_learner:
        reference, flops = nn.Identity(), 0  # never called: the score needs no reference
    else:
        reference, flops = build_reference(
            setup.data, setup.model, device=setup.device, bf16=setup.bf16, seed=setup.seed
        )
    return [
        JestSelector(
            config,
            reference,
            device=setup.device,
            bf16=setup.bf16,
            seed=setup.seed * 1_009 + rank,
            reference_flops=flops,
        )
        for rank in setup.ranks
    ]
