"""Building the model a config names: the built-in GPT, a Hugging Face causal LM (`hf`), or a
user's `module:factory`."""

from __future__ import annotations

from torch import nn

from diloco.errors import ConfigError
from diloco.models.config import ModelConfig
from diloco.models.gpt import GPT, GPTConfig
from diloco.resolve import call_factory


def build_model(config: ModelConfig, context: int, data_vocab_size: int | None = None) -> nn.Module:
    """The model named by `config` (GPT with `context` positions, an HF model, or a user
    factory); `data_vocab_size` is the data's vocabulary when known (an HF model's must hold
    it, and an inline HF config without vocab_size takes it)."""
    if config.name == "hf":
        from diloco.models.hf import build_hf_model

        return build_hf_model(config.hf, seq_len=context, vocab_size=data_vocab_size)
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
