"""The options of the runtime itself: outputs, seed, device, checkpoints, evaluation.

These belong to the process that runs islands (`islands/island.py`, the composition root), not
to one component of the library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from diloco.errors import require
from diloco.metrics.wandb_config import WandbConfig


class Device(enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Progress(enum.Enum):
    auto = "auto"
    bar = "bar"
    lines = "lines"
    none = "none"


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    """Output directory: metrics.jsonl, summary.json, checkpoints/ (see docs/output.md).
    Multi-process transports write to run.dir/island-{rank}/."""
    seed: int = 0
    """Seed of model initialisation and of every island's data stream."""
    device: Device = Device.auto
    """auto (cuda when available, else cpu), cpu or cuda."""
    precision: Precision = Precision.auto
    """Inner-loop compute precision: auto (bf16 autocast on cuda, fp32 on cpu), fp32, bf16.
    Parameters, optimizer state and everything the outer loop touches stay fp32."""
    checkpoint_every: int = 1
    """Write a checkpoint every this many outer rounds, and always after the last round
    (0: only after the last round)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep on disk."""
    init_from: str = ""
    """A warm start: the initial weights of every island, from a diloco checkpoint
    (run.dir/checkpoints/round-*.safetensors), a safetensors or torch state_dict of the model, or
    a Hugging Face directory (config.json + safetensors). Read when a run starts afresh (a
    resumed run takes its checkpoint); every island must be given the same weights (their hash
    is in the group fingerprint)."""
    resume: bool = True
    """Resume from the newest checkpoint in run.dir when there is one (metrics.jsonl rows
    written after it are dropped); false, or no checkpoint: start at round 0 with a new
    metrics.jsonl."""
    progress: Progress = Progress.auto
    """auto (a bar on a terminal, plain lines otherwise), bar, lines or none."""
    tensorboard: bool = False
    """Also write TensorBoard events to run.dir/tensorboard (needs the tensorboard package)."""
    threads: int = 0
    """torch intra-op threads on cpu (0: leave torch's default)."""
    compile: bool = False
    """torch.compile the inner model (the first steps pay the compilation; bench/compile.py
    measures what it buys on this machine)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Also log every metrics row to Weights & Biases (needs the wandb extra)."""

    def __post_init__(self) -> None:
        require(bool(self.dir), "run.dir", "a non-empty path", self.dir)
        require(self.checkpoint_every >= 0, "run.checkpoint_every", ">= 0", self.checkpoint_every)
        require(self.keep_checkpoints >= 1, "run.keep_checkpoints", ">= 1", self.keep_checkpoints)
        require(self.threads >= 0, "run.threads", ">= 0", self.threads)

    def ignored_options(self) -> dict[str, str]:
        return self.wandb.ignored_options()


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 1
    """Evaluate the shared parameters every this many rounds, and always after the last
    round (0: only after the last round)."""
    batches: int = 8
    """Validation batches (of data.batch_size sequences) per evaluation."""

    def __post_init__(self) -> None:
        require(self.every >= 0, "eval.every", ">= 0", self.every)
        require(self.batches >= 1, "eval.batches", ">= 1", self.batches)
