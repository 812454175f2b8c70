"""Loading weights into a model from a file someone gave us, without ever unpickling it.

Used by a warm start (`run.init_from`) and JEST's reference (`data.selector.reference
.checkpoint`). Accepted: a diloco checkpoint (`round-*.safetensors`: its shared parameters), a
safetensors state_dict, a torch state_dict read with `weights_only=True`, or a Hugging Face
directory (config.json + safetensors; the built-in GPT reads a GPT-2 directory).
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from diloco.checkpoint.store import load_checkpoint
from diloco.errors import ConfigError
from diloco.outer.pseudo_gradient import copy_flat_into_


def load_weights_(model: nn.Module, path: str, *, key: str) -> None:
    """Overwrite `model`'s parameters with the weights at `path`.

    Raises:
        ConfigError: naming `key`, when the file is missing, unreadable, could run code, or does
            not fit the model.
    """
    source = Path(path)
    if source.is_dir():
        from diloco.models.hf_export import load_hf_weights_

        load_hf_weights_(model, source, key=key)
        return
    if not source.is_file():
        raise ConfigError(f"{key}: file {path!r} does not exist")
    try:
        state = _read(source)
    except Exception as error:  # any failure to read is the user's file, not our bug
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"{key}: cannot read {path!r}: {first_line or type(error).__name__}"
        ) from None
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    try:
        if isinstance(state, dict) and "outer" in state:  # a diloco checkpoint
            anchor_N = state["outer"]["anchor"]
            if anchor_N.numel() != numel:
                raise ValueError(f"it holds {anchor_N.numel()} parameters, the model {numel}")
            copy_flat_into_(params, anchor_N)
        else:
            _load_state_dict(model, state)
    except (ValueError, RuntimeError, KeyError, TypeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{key}: {path!r} does not fit the model: {first_line}") from None


def _load_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`load_state_dict`, where a tied weight may be saved once (safetensors keeps one name of
    tensors that share memory, as for the GPT's embedding and output layer)."""
    result = model.load_state_dict(state, strict=False)
    owners = {t.data_ptr(): name for name, t in model.state_dict().items() if name in state}
    current = model.state_dict()
    missing = [name for name in result.missing_keys if current[name].data_ptr() not in owners]
    if missing or result.unexpected_keys:
        raise ValueError(f"missing {missing}, unexpected {list(result.unexpected_keys)}")


def _read(file: Path) -> Any:
    if file.suffix == ".safetensors":
        match = re.match(r"^round-(\d+)\.safetensors$", file.name)
        if match:
            return load_checkpoint(file.parent, int(match.group(1)))
        return load_file(str(file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on pickle protocols: not the user's
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(
                "it is not a state_dict of tensors (refused: loading it could run code)"
            ) from None
