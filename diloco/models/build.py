"""Building the model a config names: the built-in GPT, or a user's `module:factory`."""

from __future__ import annotations

from torch import nn

from diloco.errors import ConfigError
from diloco.models.config import ModelConfig
from diloco.models.gpt import GPT, GPTConfig
from diloco.resolve import call_factory


def build_model(config: ModelConfig, context: int) -> nn.Module:
    """The model named by `config` (GPT with `context` positions, or a user factory)."""
    if config.name == "gpt":
        return GPT(
            GPTConfig(
                n_layer=config.n_layer,
                n_head=config.n_head,
                d_model=config.d_model,
                vocab_size=config.vocab_size,
                context=context,
                dropout=config.dropout,
            )
        )
    model = call_factory(config.name, "model.name", args=config.args, args_key="model.args")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name: {config.name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
