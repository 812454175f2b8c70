"""The `run.wandb` section: log each metrics row to Weights & Biases as well.

Off unless `run.wandb.project` is set. `mode: offline` writes the run under run.dir/wandb
without a network (`wandb sync` uploads it later). Needs the `wandb` extra. Standard library
only, so that a config error answers without importing wandb.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from diloco.errors import ConfigError

KEY = "run.wandb"


class WandbMode(enum.Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass(kw_only=True)
class WandbConfig:
    project: str = ""
    """Weights & Biases project to log to; empty: no wandb logging."""
    name: str = ""
    """The wandb run's display name; empty: run.dir's last folder (with -island-<rank> for
    multi-process transports, where every island logs its own run)."""
    mode: WandbMode = WandbMode.online
    """online (upload as it runs), offline (write under run.dir/wandb only; upload later with
    `wandb sync`) or disabled (wandb's no-op mode: nothing written)."""

    def __post_init__(self) -> None:
        if self.project != self.project.strip() or "/" in self.project:
            raise ConfigError(f"{KEY}.project must be a project name, got {self.project!r}")

    def ignored_options(self) -> dict[str, str]:
        """The keys set to non-defaults that have no effect (no project: no logging), each
        with what would read it."""
        if self.project:
            return {}
        default = WandbConfig()
        return {
            f"{KEY}.{key}": f"read only with {KEY}.project set"
            for key in ("name", "mode")
            if getattr(self, key) != getattr(default, key)
        }

    @property
    def enabled(self) -> bool:
        """Whether rows are logged at all."""
        return bool(self.project) and self.mode is not WandbMode.disabled
