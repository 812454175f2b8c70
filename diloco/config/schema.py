"""The one typed schema of every option: `IslandConfig` composes each component's own section.

Each component owns its config dataclass, next to it: `transport` (diloco/transports/config.py,
with grpc/config.py and hivemind/config.py), `outer` (diloco/outer/config.py), `inner`
(diloco/inner/config.py), `data` (diloco/data/config.py, with selectors/config.py), `model`
(diloco/models/config.py), `island` (diloco/parallel/config.py); `run` and `eval` are the
runtime's own (diloco/config/run.py).
omegaconf turns `IslandConfig` into a structured config, so YAML files and dotted overrides are
checked against these types (unknown keys, wrong types); the `__post_init__` checks, run by
`OmegaConf.to_object`, refuse impossible values and name the YAML path. The string under each
field is its documentation: `docs/config.md` is generated from it (`make docs`).

Paper: DiLoCo, Douillard et al. 2023, https://arxiv.org/abs/2311.08105
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diloco.config.run import Device, EvalConfig, RunConfig
from diloco.data.config import DataConfig
from diloco.errors import ConfigError
from diloco.inner.config import InnerConfig
from diloco.models.config import ModelConfig
from diloco.outer.config import OuterConfig
from diloco.parallel.config import IslandSection
from diloco.transports.config import TorchBackend, TransportConfig


@dataclass(kw_only=True)
class IslandConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Outputs, seed, device, checkpoints and display of this process."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """How the islands find each other and average their pseudo-gradients."""
    outer: OuterConfig = field(default_factory=OuterConfig)
    """The outer loop: rounds, H, the outer optimizer (Nesterov SGD by default) and the codec."""
    inner: InnerConfig = field(default_factory=InnerConfig)
    """The inner AdamW optimizer of each island, and its learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """What each island trains on; every island reads its own shard or stream."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model every island trains a replica of."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation loss of the shared parameters, written to metrics.jsonl as val_loss."""
    island: IslandSection = field(default_factory=IslandSection)
    """How many processes (GPUs) one island is, and how they share its inner loop."""

    def __post_init__(self) -> None:
        self.outer.adopt_island_count(self.transport.islands)
        if self.run.device is Device.cpu and self.transport.torch.backend is TorchBackend.nccl:
            raise ConfigError("transport.torch.backend nccl needs run.device cuda or auto")

    def ignored_options(self) -> dict[str, str]:
        """Every key set to a non-default value that this configuration never reads, each
        with what would read it."""
        return (
            self.run.ignored_options()
            | self.model.ignored_options()
            | self.data.ignored_options()
            | self.outer.ignored_options()
            | self.transport.ignored_options()
        )
