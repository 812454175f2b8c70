"""The `model.hf` section: a Hugging Face causal language model, built from local files only.

`model.name: hf` trains any `AutoModelForCausalLM`-compatible architecture: either random
weights from a config (`model.hf.config`), or a local pretrained directory
(`model.hf.pretrained`). Nothing is downloaded. Standard library only, so that a config error
answers without importing torch or transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diloco.errors import ConfigError

KEY = "model.hf"


@dataclass(kw_only=True)
class HfModelConfig:
    config: Any = ""
    """Random initial weights from a Hugging Face model config: either a local directory
    holding config.json, or the config's fields inline as a mapping, e.g. {model_type: llama,
    hidden_size: 128, num_hidden_layers: 4, num_attention_heads: 4, intermediate_size: 512};
    an inline mapping without vocab_size takes the tokenizer's (data.hf.tokenizer). Typed Any
    because a structured config cannot hold a str | dict union; checked when loaded. Empty:
    use model.hf.pretrained."""
    pretrained: str = ""
    """A local directory holding config.json and safetensors weights (save_pretrained's
    output, or `diloco-island export`'s): training starts from those weights. Empty: use
    model.hf.config."""

    def __post_init__(self) -> None:
        self.config = _plain(self.config)
        if isinstance(self.config, dict):
            keys = [key for key in self.config if not isinstance(key, str)]
            if keys:
                raise ConfigError(f"{KEY}.config: field names must be strings, got {keys[0]!r}")
            if not isinstance(self.config.get("model_type"), str):
                raise ConfigError(
                    f"{KEY}.config: an inline config needs model_type (e.g. llama, gpt2), got "
                    f"the fields {sorted(self.config)}"
                )
        elif not isinstance(self.config, str):
            raise ConfigError(
                f"{KEY}.config must be a directory holding config.json or a mapping of config "
                f"fields, got {type(self.config).__name__} {self.config!r}"
            )
        if self.config and self.pretrained:
            raise ConfigError(
                f"{KEY}.config and {KEY}.pretrained are exclusive: set one, got both "
                f"({self.config!r} and {self.pretrained!r})"
            )

    def require(self) -> None:
        """Refuse a section with neither source (called when model.name is hf).

        Raises:
            ConfigError: neither model.hf.config nor model.hf.pretrained is set.
        """
        if not self.config and not self.pretrained:
            raise ConfigError(
                f"model.name hf needs {KEY}.config (a directory or inline fields) or "
                f"{KEY}.pretrained (a directory with weights), got neither"
            )


def _plain(value: Any) -> Any:
    """Plain dicts and lists from any mapping or sequence (omegaconf's containers included)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
