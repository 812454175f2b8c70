"""The `data.selector` section, and the selectors by name.

`SELECTORS` owns the names of `data.selector.name`; each builder imports its selector only when
called (the config loads without torch). Adding a selector: its module, one `SelectorName`
member and one `SELECTORS` entry here (and its options, if any, in `SelectorConfig`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from diloco.data.selectors.jest_config import JestScore, ReferenceConfig
from diloco.errors import require

if TYPE_CHECKING:
    from diloco.data.selectors.base import Selector, SelectorSetup


class SelectorName(enum.Enum):
    uniform = "uniform"
    jest = "jest"


@dataclass(kw_only=True)
class SelectorConfig:
    name: SelectorName = SelectorName.uniform
    """Which examples the inner loop trains on: uniform (all) or jest (the most learnable of a
    super-batch, per the learner and a frozen reference; arXiv 2406.17711)."""
    ratio: float = 0.5
    """jest: the kept fraction; each step draws a super-batch of data.batch_size / ratio
    sequences and trains on data.batch_size of them. 1/ratio must be a whole number."""
    score: JestScore = JestScore.learnability
    """jest: learnability (learner loss - reference loss, the default), hard_learner (learner
    loss) or easy_reference (minus the reference loss; needs no learner forward)."""
    temperature: float = 0.0
    """jest: 0 keeps the data.batch_size best scores; > 0 samples them without replacement
    with probabilities softmax(score / temperature), which is what JEST's chunked joint
    sampling reduces to for per-sequence losses (docs/results/jest.md)."""
    rescore_every: int = 1
    """jest: the learner's losses are computed every this many steps; on the steps between,
    the learner term is dropped (learnability ranks by the reference alone, hard_learner keeps
    the first data.batch_size), saving the learner's scoring forward."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """jest: the frozen reference model (loaded, or trained first on clean data)."""

    def __post_init__(self) -> None:
        key = "data.selector"
        require(0 < self.ratio <= 1, f"{key}.ratio", "in (0, 1]", self.ratio)
        whole = abs(1 / self.ratio - round(1 / self.ratio)) < 1e-6
        require(whole, f"{key}.ratio", "1/n for a whole number n (0.5, 0.25, ...)", self.ratio)
        require(self.temperature >= 0, f"{key}.temperature", ">= 0", self.temperature)
        require(self.rescore_every >= 1, f"{key}.rescore_every", ">= 1", self.rescore_every)

    def ignored_options(self) -> dict[str, str]:
        """The keys set to non-defaults that the chosen selector never reads, each with what
        would read it."""
        default = SelectorConfig()
        changed = [key for key in vars(default) if getattr(self, key) != getattr(default, key)]
        ignored: dict[str, str] = {}
        if self.name is SelectorName.uniform:
            ignored = {key: "read only by data.selector.name=jest" for key in changed}
            ignored.pop("name", None)
        else:
            if self.score is JestScore.easy_reference and "rescore_every" in changed:
                ignored["rescore_every"] = "not read by data.selector.score=easy_reference"
            if self.score is JestScore.hard_learner and "reference" in changed:
                ignored["reference"] = "not read by data.selector.score=hard_learner"
            reference, default_reference = self.reference, default.reference
            if reference.checkpoint:
                ignored |= {
                    f"reference.{key}": "data.selector.reference.checkpoint is set: it is not "
                    "trained"
                    for key in ("data", "train_steps", "lr")
                    if getattr(reference, key) != getattr(default_reference, key)
                }
        return {f"data.selector.{key}": reason for key, reason in ignored.items()}


def _uniform(setup: SelectorSetup) -> list[Selector]:
    from diloco.data.selectors.uniform import UniformSelector

    return [UniformSelector() for _ in setup.ranks]


def _jest(setup: SelectorSetup) -> list[Selector]:
    from diloco.data.selectors.jest import build_jest_selectors

    selectors: list[Selector] = [*build_jest_selectors(setup)]
    return selectors


SELECTORS: dict[str, Callable[[SelectorSetup], list[Selector]]] = {
    "uniform": _uniform,
    "jest": _jest,
}


def build_selectors(setup: SelectorSetup) -> list[Selector]:
    """One selector per hosted island; the islands of a process share one frozen reference.

    Raises:
        ConfigError: the reference's checkpoint or clean data cannot be used.
    """
    return SELECTORS[setup.data.selector.name.value](setup)
