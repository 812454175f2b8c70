"""The `model` section: the built-in GPT's sizes, or a user's `module:factory`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diloco.errors import ConfigError, require
from diloco.models.hf_config import HfModelConfig


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "gpt"
    """gpt (the built-in small GPT), hf (a Hugging Face causal LM from local files: model.hf)
    or module:factory returning an nn.Module whose forward on a batch returns the scalar
    loss."""
    n_layer: int = 4
    """GPT: transformer blocks."""
    n_head: int = 4
    """GPT: attention heads per block."""
    d_model: int = 128
    """GPT: width of the residual stream."""
    vocab_size: int = 256
    """GPT: vocabulary size (256 for byte-level data). The built-in data sources (stdlib, text,
    tokens) also refuse token ids at or above it, whatever the model."""
    dropout: float = 0.0
    """GPT: dropout probability."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a module:factory model."""
    hf: HfModelConfig = field(default_factory=HfModelConfig)
    """model.name hf: any AutoModelForCausalLM-compatible model, random from a config or
    pretrained from a local directory (needs the hf extra: pip install -e ".[hf]")."""

    def __post_init__(self) -> None:
        require(
            self.name in ("gpt", "hf") or ":" in self.name,
            "model.name",
            "gpt, hf or module:factory",
            self.name,
        )
        if self.name == "hf":
            self.hf.require()
        require(self.n_layer >= 1, "model.n_layer", ">= 1", self.n_layer)
        require(self.n_head >= 1, "model.n_head", ">= 1", self.n_head)
        if self.d_model < 1 or self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model must be a positive multiple of model.n_head={self.n_head}, "
                f"got {self.d_model}"
            )
        require(self.vocab_size >= 2, "model.vocab_size", ">= 2", self.vocab_size)
        require(0 <= self.dropout < 1, "model.dropout", "in [0, 1)", self.dropout)

    def ignored_options(self) -> dict[str, str]:
        """The keys set to non-defaults that this model never reads, each with what would."""
        default = ModelConfig()
        ignored: dict[str, str] = {}
        if self.name != "gpt":
            gpt_keys = ("n_layer", "n_head", "d_model", "vocab_size", "dropout")
            ignored |= {
                f"model.{key}": "read only by model.name=gpt"
                for key in gpt_keys
                if getattr(self, key) != getattr(default, key)
            }
        if ":" not in self.name and self.args:
            ignored["model.args"] = "read only by a factory (model.name=module:function)"
        if self.name != "hf" and self.hf != default.hf:
            ignored["model.hf"] = "read only by model.name=hf"
        return ignored
