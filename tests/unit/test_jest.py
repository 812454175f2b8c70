"""JEST's pure parts: scores, the choice of examples, the selector with hand-set losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diloco.data.base import Batch
from diloco.data.selectors.config import SelectorConfig
from diloco.data.selectors.jest import JestSelector, choose, jest_scores, per_sequence_losses
from diloco.data.selectors.jest_config import JestScore
from diloco.models.gpt import GPT, GPTConfig

LEARNER = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
REFERENCE = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 2.0, 0.0])


class ColumnLoss(nn.Module):
    """A fake model whose loss of example i is inputs[i, column]: losses set by hand."""

    def __init__(self, column: int):
        super().__init__()
        self.column = column
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def per_example_loss(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return inputs[:, self.column] + self.weight

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.per_example_loss(inputs).mean()


def hand_set_batch() -> Batch:
    inputs = torch.stack([LEARNER, REFERENCE, torch.arange(8.0)], dim=1)  # col 2: the row id
    noisy = torch.tensor([True, False, True, False, True, False, True, False])
    return Batch(inputs, num_tokens=8 * 10, noisy=noisy)


def selector(**options: object) -> tuple[JestSelector, ColumnLoss, ColumnLoss]:
    config = SelectorConfig(**options)  # type: ignore[arg-type]
    learner, reference = ColumnLoss(0), ColumnLoss(1)
    cpu = torch.device("cpu")
    return JestSelector(config, reference, device=cpu, bf16=False, seed=3), learner, reference


def test_scores_follow_their_definitions() -> None:
    assert torch.equal(jest_scores(LEARNER, REFERENCE, JestScore.learnability), LEARNER - REFERENCE)
    assert torch.equal(jest_scores(LEARNER, REFERENCE, JestScore.hard_learner), LEARNER)
    assert torch.equal(jest_scores(LEARNER, REFERENCE, JestScore.easy_reference), -REFERENCE)
    # Without the learner's losses (between two learner scorings): the reference alone.
    assert torch.equal(jest_scores(None, REFERENCE, JestScore.learnability), -REFERENCE)
    assert jest_scores(None, None, JestScore.hard_learner) is None


def test_greedy_choice_keeps_the_highest_scores_in_stream_order() -> None:
    # learnability [2, 0, 3, 0, 0, 8, 0, 6]: the best four are rows 5, 7, 2, 0.
    assert choose(LEARNER - REFERENCE, 4, 0.0).tolist() == [0, 2, 5, 7]
    # Ties go to the earlier row: rows 1, 3, 4 and 6 all score 0.
    assert choose(LEARNER - REFERENCE, 5, 0.0).tolist() == [0, 1, 2, 5, 7]
    assert choose(None, 3, 0.0).tolist() == [0, 1, 2]


def test_sampling_is_deterministic_per_seed_and_follows_the_scores() -> None:
    scores = torch.linspace(0, 10, 32)
    draw = lambda seed: choose(scores, 8, 1.0, torch.Generator().manual_seed(seed)).tolist()  # noqa: E731
    assert draw(0) == draw(0)
    assert len({tuple(draw(seed)) for seed in range(5)}) > 1
    picked = torch.zeros(32)
    for seed in range(200):
        picked[draw(seed)] += 1
    # softmax(score / 1): the top quarter of the scores is picked far more often than the rest.
    assert picked[24:].sum() > 10 * picked[:8].sum()
    # A huge temperature flattens the distribution: every row gets picked sometimes.
    flat = torch.zeros(32)
    for seed in range(200):
        flat[choose(scores, 8, 1e6, torch.Generator().manual_seed(seed))] += 1
    assert (flat > 0).all()


@pytest.mark.parametrize(
    ("score", "kept"),
    [
        (JestScore.learnability, [0, 2, 5, 7]),
        (JestScore.hard_learner, [2, 4, 5, 7]),
        (JestScore.easy_reference, [0, 1, 2, 7]),
    ],
)
def test_selector_keeps_exactly_the_right_examples(score: JestScore, kept: list[int]) -> None:
    jest, learner, _ = selector(ratio=0.5, score=score)
    batch = jest.select(hand_set_batch(), learner)
    assert batch.inputs[:, 2].long().tolist() == kept
    assert batch.inputs.shape[0] == 4  # batch_size = super-batch * ratio
    assert batch.num_tokens == 40
    assert batch.noisy.tolist() == [k % 2 == 0 for k in kept]
    assert jest.cost.scoring_flops > 0 and jest.cost.scoring_s >= 0


def test_selector_is_deterministic_for_a_seed_when_sampling() -> None:
    runs = []
    for _ in range(2):
        jest, learner, _ = selector(ratio=0.25, temperature=2.0)
        runs.append(
            [jest.select(hand_set_batch(), learner).inputs[:, 2].tolist() for _ in range(6)]
        )
    assert runs[0] == runs[1]
    assert all(len(kept) == 2 for kept in runs[0])


def test_rescore_every_skips_the_learner_between_scorings() -> None:
    jest, learner, reference = selector(ratio=0.5, rescore_every=3)
    kept = [jest.select(hand_set_batch(), learner).inputs[:, 2].long().tolist() for _ in range(4)]
    assert learner.calls == 2 and reference.calls == 4  # steps 0 and 3 used the learner
    assert kept[0] == kept[3] == [0, 2, 5, 7]
    assert kept[1] == kept[2] == [0, 1, 2, 7]  # the lowest reference losses


def test_selector_state_resumes_the_same_draws() -> None:
    first, learner, _ = selector(ratio=0.5, temperature=1.0)
    first.select(hand_set_batch(), learner)
    resumed, _, _ = selector(ratio=0.5, temperature=1.0)
    resumed.load_state_dict(first.state_dict())
    assert resumed.cost == first.cost
    assert torch.equal(
        first.select(hand_set_batch(), learner).inputs,
        resumed.select(hand_set_batch(), learner).inputs,
    )


def test_gpt_per_sequence_losses_average_to_its_loss_and_leave_it_training() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, context=8))
    tokens = torch.randint(0, 256, (5, 9))
    losses = per_sequence_losses(model, tokens, torch.device("cpu"))
    assert losses.shape == (5,)
    assert model.training
    with torch.no_grad():
        assert torch.allclose(losses.mean(), model(tokens), atol=1e-5)
        assert torch.allclose(losses[2], model(tokens[2:3]), atol=1e-5)


class MeanOnly(nn.Module):
    """A model with only the protocol's scalar loss: scored one row at a time."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.sum(dim=1).mean()


def test_a_model_without_per_example_loss_is_scored_row_by_row() -> None:
    losses = per_sequence_losses(
        MeanOnly(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.device("cpu")
    )
    assert losses.tolist() == [3.0, 7.0]
