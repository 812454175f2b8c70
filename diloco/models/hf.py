"""A Hugging Face causal language model behind the project's contract: forward(tokens) -> loss.

`HfCausalLM` wraps any `AutoModelForCausalLM`-compatible model (Llama, GPT-2, Qwen, ...). It
takes the same windows as the built-in GPT (`[B, T + 1]` int64 tokens) and returns the mean
next-token cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1], so that all T
positions of a window train, as in `diloco.models.gpt.GPT`. The loss is computed here from
the model's logits rather than through each model's `labels=` argument, which shifts inside
the model and so would train only T - 1 positions of the window; the formula is the one HF's
`ForCausalLMLoss` uses (fp32 logits, ignore_index -100).

Models are built from local files only (`local_files_only=True`, safetensors only); the
parameters are always fp32, since the outer loop and AdamW keep fp32 state.

Shape legend: B batch, T time (sequence), V vocabulary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from diloco.errors import ConfigError
from diloco.extras import require_extra
from diloco.models.hf_config import KEY, HfModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Targets with this id do not count in the loss (PyTorch's and HF's convention)."""
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")
"""Config fields that hold a model's context length, in the order they are looked up."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class HfCausalLM(nn.Module):
    """forward(tokens_BT1) -> mean cross-entropy of tokens[:, 1:] given tokens[:, :-1].

    Args:
        model: the causal LM (its forward takes input_ids and returns .logits).
        seq_len: tokens per training window (for the FLOP count's attention term).
        pad_token_id: targets equal to it are masked out of the loss (right padding), or
            None when the data is packed without padding.
    """

    def __init__(self, model: PreTrainedModel, *, seq_len: int, pad_token_id: int | None):
        super().__init__()
        self.model = model
        self.seq_len = seq_len
        self.pad_token_id = pad_token_id

    @property
    def vocab_size(self) -> int:
        """Token ids the model accepts: its input embedding's rows."""
        embedding = self.model.get_input_embeddings()
        assert isinstance(embedding, nn.Embedding)
        return int(embedding.num_embeddings)

    def logits(self, idx_BT: torch.Tensor) -> torch.Tensor:
        # use_cache=False: in training a model would otherwise build a KV cache every step.
        logits_BTV: torch.Tensor = self.model(input_ids=idx_BT, use_cache=False).logits
        return logits_BTV

    def forward(self, tokens_BT1: torch.Tensor) -> torch.Tensor:
        logits_BTV = self.logits(tokens_BT1[:, :-1])
        targets_BT = tokens_BT1[:, 1:]
        if self.pad_token_id is not None:
            targets_BT = targets_BT.masked_fill(targets_BT == self.pad_token_id, IGNORE_INDEX)
        return F.cross_entropy(
            logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=IGNORE_INDEX
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 N plus attention (PaLM appendix B), as the built-in GPT."""
        config = self.model.config
        layers = getattr(config, "num_hidden_layers", None)
        width = getattr(config, "hidden_size", None)
        attention = 12 * layers * width * self.seq_len if layers and width else 0
        return 6 * self.num_params() + attention


def build_hf_model(config: HfModelConfig, *, seq_len: int, vocab_size: int | None) -> HfCausalLM:
    """The `model.hf` model, random from a config or loaded from a pretrained directory.

    Random weights come from torch's global generator: seed it first for the same weights on
    every island.

    Args:
        config: the model.hf section.
        seq_len: data.seq_len; it must fit the model's context.
        vocab_size: how many token ids the data uses (the tokenizer's vocabulary, 256 for byte
            data), or None when unknown. An inline config without vocab_size takes it.

    Raises:
        ConfigError: transformers is missing, a directory lacks config.json or weights, the
            config is not one transformers can build, the context is shorter than
            data.seq_len, or the vocabulary is smaller than the data's.
    """
    config.require()
    transformers = require_extra("transformers", key="model.name hf", extra="hf")
    key = f"{KEY}.pretrained" if config.pretrained else f"{KEY}.config"
    if config.pretrained:
        directory = _model_directory(config.pretrained, key)
        _require_weights(directory, key)
        hf_config = _config_from_directory(directory, key)
    elif isinstance(config.config, dict):
        hf_config = _inline_config(config.config, vocab_size)
    else:
        hf_config = _config_from_directory(_model_directory(config.config, key), key)
    _check_context(hf_config, seq_len, key)
    _check_vocab(int(hf_config.vocab_size), vocab_size, key)
    auto = transformers.AutoModelForCausalLM
    try:
        if config.pretrained:
            model = _load_pretrained(auto, directory, key)
        else:
            model = auto.from_config(hf_config)
    except (ValueError, KeyError, OSError) as error:
        raise ConfigError(
            f"{key}: transformers cannot build the model: {_first_line(error)}"
        ) from None
    nn.Module.float(model)  # a bf16 checkpoint trains with fp32 master weights
    adapter = HfCausalLM(model, seq_len=seq_len, pad_token_id=_pad_token_id(model.config))
    _check_vocab(adapter.vocab_size, vocab_size, key)
    return adapter


def _model_directory(path: str, key: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{key}: {path!r} is not a directory (expected one holding config.json)")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{key}: directory {path!r} holds no config.json")
    return directory


def _require_weights(directory: Path, key: str) -> None:
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(
            f"{key}: directory {str(directory)!r} holds no safetensors weights "
            f"({' or '.join(WEIGHT_FILES)}); pickle .bin weights are not loaded"
        )


def _config_from_directory(directory: Path, key: str) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(directory, local_files_only=True)
        return config
    except (ValueError, KeyError, OSError) as error:
        raise ConfigError(
            f"{key}: cannot read {directory}/config.json: {_first_line(error)}"
        ) from None


def _inline_config(fields: dict[str, Any], vocab_size: int | None) -> PretrainedConfig:
    from transformers import CONFIG_MAPPING

    model_type = fields["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"{KEY}.config: model_type {model_type!r} is not a model type transformers knows "
            "(e.g. llama, gpt2, qwen2, mistral)"
        )
    config_class = CONFIG_MAPPING[model_type]
    kwargs = {name: value for name, value in fields.items() if name != "model_type"}
    if "vocab_size" not in kwargs and vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    defaults = config_class()
    vocab = kwargs.get("vocab_size", defaults.vocab_size)
    for name in SPECIAL_IDS:  # a default id past a small vocabulary (GPT-2's 50256) means none
        default = getattr(defaults, name, None)
        if name not in kwargs and isinstance(default, int) and default >= vocab:
            kwargs[name] = None
    # HF configs keep any unknown keyword as an attribute: a typo would silently do nothing.
    unknown = sorted(name for name in kwargs if not hasattr(defaults, name))
    if unknown:
        log.warning("%s.config: %s has no field %s; ignored", KEY, model_type, ", ".join(unknown))
    try:
        return config_class(**kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"{KEY}.config: {model_type} config refused: {_first_line(error)}"
        ) from None


def _load_pretrained(auto: Any, directory: Path, key: str) -> PreTrainedModel:
    model, info = auto.from_pretrained(
        directory, local_files_only=True, use_safetensors=True, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ConfigError(
            f"{key}: {directory} lacks {len(missing)} of the model's weights (e.g. "
            f"{missing[0]}); they would start random instead of from the directory"
        )
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        log.warning(
            "%s: %d weights of %s are not used, e.g. %s",
            key,
            len(unexpected),
            directory,
            unexpected[0],
        )
    return model  # type: ignore[no-any-return]


def context_length(hf_config: PretrainedConfig) -> int | None:
    """The model's context in tokens (the first of CONTEXT_FIELDS it has), or None."""
    for name in CONTEXT_FIELDS:
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_context(hf_config: PretrainedConfig, seq_len: int, key: str) -> None:
    context = context_length(hf_config)
    if context is not None and seq_len > context:
        raise ConfigError(
            f"data.seq_len must be at most the model's context of {context} positions "
            f"({key}), got {seq_len}"
        )


def _check_vocab(model_vocab: int, data_vocab: int | None, key: str) -> None:
    if data_vocab is not None and data_vocab > model_vocab:
        raise ConfigError(
            f"{key}: the model's vocabulary of {model_vocab} tokens must cover the data's "
            f"{data_vocab} token ids (data.hf.tokenizer's vocabulary, or 256 bytes); raise "
            "its vocab_size"
        )


def _pad_token_id(hf_config: PretrainedConfig) -> int | None:
    """The padding id to mask, unless it doubles as the end-of-text separator of packed data."""
    pad = hf_config.pad_token_id
    eos = hf_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    if pad is None or pad in eos_ids:
        return None
    return int(pad)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
