"""The shared model as a Hugging Face directory (config.json + model.safetensors), and back.

`export_hf` writes what `AutoModelForCausalLM.from_pretrained(out_dir)` loads, with the same
logits as the project's model. A `model.name: hf` model is saved by its own
`save_pretrained`. The built-in GPT is converted to `GPT2LMHeadModel`, which is the same
network (pre-norm blocks, LayerNorm eps 1e-5 with biases, exact-erf GELU, learned positions,
tied embeddings, fused qkv split q, k, v): only the names change, and GPT-2's `Conv1D` stores
its weight as [in, out], the transpose of `nn.Linear`'s. `load_hf_weights_` is the way back,
for a warm start from such a directory.

GPT-2: Radford et al. 2019; the layout is transformers' `modeling_gpt2.py`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from diloco.errors import ConfigError
from diloco.extras import require_extra
from diloco.models.gpt import GPT
from diloco.models.hf import HfCausalLM

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Files of a tokenizer directory copied next to an exported model (never its config.json)."""
LINEAR_TO_CONV1D = (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"))
LINEAR_TO_CONV1D_MLP = (("mlp.0", "mlp.c_fc"), ("mlp.2", "mlp.c_proj"))


def export_hf(
    model: nn.Module, out_dir: Path, *, tokenizer: str = "", eos_token_id: int | None = None
) -> Path:
    """Write `model` (holding the weights to export) as a Hugging Face directory.

    Args:
        model: the built-in GPT or an `HfCausalLM` (a torch.compile wrapper is unwrapped).
        out_dir: created if missing; existing files of the same names are replaced.
        tokenizer: a tokenizer.json or tokenizer directory copied alongside (empty: none).
        eos_token_id: the built-in GPT's end-of-text id for generation (None: unset).

    Returns:
        `out_dir`.

    Raises:
        ConfigError: the model is neither (a `module:factory` model), or transformers is
            missing.
    """
    model = getattr(model, "_orig_mod", model)
    require_extra("transformers", key="export", extra="hf")
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, HfCausalLM):
        model.model.save_pretrained(out_dir)
    elif isinstance(model, GPT):
        gpt_to_gpt2(model, eos_token_id=eos_token_id).save_pretrained(out_dir)
    else:
        raise ConfigError(
            f"export needs model.name: gpt or hf, got a {type(model).__name__} "
            "(a module:factory model has no Hugging Face counterpart)"
        )
    if tokenizer:
        _copy_tokenizer(Path(tokenizer), out_dir)
    log.info("exported %s to %s", type(model).__name__, out_dir)
    return out_dir


def gpt_to_gpt2(gpt: GPT, *, eos_token_id: int | None = None) -> GPT2LMHeadModel:
    """A `GPT2LMHeadModel` computing the same logits as `gpt` (a copy of its weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = gpt.config
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.context,
        n_embd=c.d_model,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.d_model,
        activation_function="gelu",  # exact erf, as nn.GELU(); gelu_new is the tanh one
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )
    hf_model = GPT2LMHeadModel(config)
    source = gpt.state_dict()
    state = {
        hf_name: (source[gpt_name].t() if transpose else source[gpt_name]).contiguous()
        for gpt_name, hf_name, transpose in name_pairs(c.n_layer)
    }
    hf_model.load_state_dict(state, strict=True)
    nn.Module.eval(hf_model)
    return hf_model


def name_pairs(n_layer: int) -> list[tuple[str, str, bool]]:
    """(GPT name, GPT2LMHeadModel name, transposed) for every tensor of an n_layer GPT."""
    pairs = [
        ("wte.weight", "transformer.wte.weight", False),
        ("wpe.weight", "transformer.wpe.weight", False),
        ("ln_f.weight", "transformer.ln_f.weight", False),
        ("ln_f.bias", "transformer.ln_f.bias", False),
        ("lm_head.weight", "lm_head.weight", False),  # tied to wte on both sides
    ]
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            pairs += [
                (f"{ours}{norm}.{p}", f"{theirs}{norm}.{p}", False) for p in ("weight", "bias")
            ]
        for linear, conv1d in LINEAR_TO_CONV1D + LINEAR_TO_CONV1D_MLP:
            pairs.append((f"{ours}{linear}.weight", f"{theirs}{conv1d}.weight", True))
            pairs.append((f"{ours}{linear}.bias", f"{theirs}{conv1d}.bias", False))
    return pairs


@torch.no_grad()
def load_hf_weights_(model: nn.Module, directory: Path, *, key: str = "run.init_from") -> None:
    """Overwrite `model`'s weights with those of a Hugging Face directory (a warm start).

    The built-in GPT reads a GPT-2 directory of the same sizes (what `export_hf` writes); an
    `HfCausalLM` reads a directory of its own architecture.

    Raises:
        ConfigError: the directory is missing or does not fit the model, naming `key`.
    """
    model = getattr(model, "_orig_mod", model)
    transformers = require_extra("transformers", key=key, extra="hf")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{key}: {str(directory)!r} holds no config.json")
    if not isinstance(model, (GPT, HfCausalLM)):
        raise ConfigError(f"{key}: a Hugging Face directory needs model.name: gpt or hf")
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, use_safetensors=True
        )
        state = loaded.state_dict()
        if isinstance(model, HfCausalLM):
            model.model.load_state_dict(state, strict=True)
        else:
            _check_gpt2_fits(loaded.config, model)
            pairs = name_pairs(model.config.n_layer)
            model.load_state_dict(
                {
                    ours: state[theirs].t() if flip else state[theirs]
                    for ours, theirs, flip in pairs
                },
                strict=True,
            )
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise ConfigError(f"{key}: {directory} does not fit the model: {first_line}") from None


def _check_gpt2_fits(config: object, gpt: GPT) -> None:
    expected = {
        "model_type": "gpt2",
        "n_layer": gpt.config.n_layer,
        "n_head": gpt.config.n_head,
        "n_embd": gpt.config.d_model,
        "vocab_size": gpt.config.vocab_size,
        "activation_function": "gelu",
        "n_positions": gpt.config.context,
    }
    for name, value in expected.items():
        if getattr(config, name, None) != value:
            raise ValueError(f"its {name} is {getattr(config, name, None)!r}, expected {value!r}")


def _copy_tokenizer(source: Path, out_dir: Path) -> None:
    if source.is_file():
        shutil.copyfile(source, out_dir / "tokenizer.json")
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
