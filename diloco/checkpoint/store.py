"""Checkpoints: a nested state written as named tensors (safetensors) plus JSON, checksummed.

Nothing is ever loaded with pickle: a checkpoint from someone else cannot run code. A state
(dicts, lists, tuples, numbers, strings, tensors, numpy arrays, as `state_dict()`s return them)
is split into its tensors, saved by name in one safetensors file, and a JSON tree of the rest
that refers to them; a sha256 over both is stored with them and checked on load, so a damaged
file is detected and skipped for the newest intact one (`newest_intact`).

Files are named `round-000012.safetensors` (the number of completed outer rounds) and written
atomically (`write_atomic`); the newest `keep` are kept.
safetensors: https://github.com/huggingface/safetensors
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diloco.checkpoint.atomic import remove_strays, write_atomic

log = logging.getLogger(__name__)

_NAME = re.compile(r"^round-(\d{6,})\.safetensors$")
_OLD_NAME = re.compile(r"^round-(\d{6,})\.pt$")
_FORMAT = "diloco-checkpoint-1"


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read back exactly as it was written."""


def checkpoint_path(directory: Path, round: int) -> Path:
    return directory / f"round-{round:06d}.safetensors"


def save_checkpoint(directory: Path, round: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `round` atomically; keep the newest `keep`."""
    remove_strays(directory)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    meta = json.dumps(tree, sort_keys=True)
    metadata = {"format": _FORMAT, "meta": meta, "sha256": _digest(meta, tensors)}
    final = write_atomic(
        checkpoint_path(directory, round),
        lambda path: save_file(tensors, str(path), metadata=metadata),
    )
    for old in list_checkpoints(directory)[:-keep]:
        checkpoint_path(directory, old).unlink(missing_ok=True)
    return final


def list_checkpoints(directory: Path) -> list[int]:
    """The rounds that have a checkpoint file in `directory`, ascending (intact or not)."""
    if not directory.is_dir():
        return []
    rounds = (_NAME.match(path.name) for path in directory.iterdir())
    return sorted(int(match.group(1)) for match in rounds if match)


def old_format_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints of earlier versions (`round-*.pt`, pickle), which are never loaded."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if _OLD_NAME.match(path.name))


def load_checkpoint(directory: Path, round: int) -> dict[str, Any]:
    """The state saved for `round`.

    Raises:
        FileNotFoundError: there is no checkpoint of `round`.
        DamagedCheckpoint: the file is truncated, not a checkpoint, or fails its checksum.
    """
    path = checkpoint_path(directory, round)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    try:
        with open(path, "rb") as handle:
            header_bytes = int.from_bytes(handle.read(8), "little")
        if header_bytes <= 0 or header_bytes > path.stat().st_size:
            raise DamagedCheckpoint(f"{path} is not a checkpoint (bad header)")
        tensors = load_file(str(path))
        metadata = _metadata(path)
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, DamagedCheckpoint):
            raise
        raise DamagedCheckpoint(f"{path} cannot be read ({error})") from None
    if metadata.get("format") != _FORMAT:
        raise DamagedCheckpoint(f"{path} is not a diloco checkpoint")
    meta = metadata.get("meta", "")
    if _digest(meta, tensors) != metadata.get("sha256"):
        raise DamagedCheckpoint(f"{path} fails its checksum (damaged)")
    state = _decode(json.loads(meta), tensors)
    assert isinstance(state, dict)
    return state


def newest_intact(directory: Path, rounds: list[int]) -> tuple[int, dict[str, Any]] | None:
    """The newest of `rounds` whose checkpoint loads, with its state; damaged ones are skipped
    with a one-line warning naming the file. None when no checkpoint is intact."""
    for round in sorted(rounds, reverse=True):
        try:
            return round, load_checkpoint(directory, round)
        except DamagedCheckpoint as error:
            log.warning("skipping a damaged checkpoint: %s", error)
    return None


def _metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    metadata = header.get("__metadata__", {})
    return metadata if isinstance(metadata, dict) else {}


def _digest(meta: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree of `value`, its tensors moved to `tensors` under their path."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        # safetensors refuses two entries on one storage: copy only when that would happen.
        if any(_same_storage(tensor, other) for other in tensors.values()):
            tensor = tensor.clone()
        tensors[path or "."] = tensor
        return {"$t": path or "."}
    if isinstance(value, np.ndarray):
        tensors[path or "."] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"$np": path or "."}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"cannot checkpoint the key {key!r} at {path or 'the top'}")
            items.append([key, _encode(item, f"{path}.{key}", tensors)])
        return {"$d": items}
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path or 'the top'}")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(item, tensors) for item in tree]
    if not isinstance(tree, dict):
        return tree
    if "$t" in tree:
        return tensors[tree["$t"]]
    if "$np" in tree:
        return tensors[tree["$np"]].numpy()
    if "$tuple" in tree:
        return tuple(_decode(item, tensors) for item in tree["$tuple"])
    return {key: _decode(item, tensors) for key, item in tree["$d"]}
