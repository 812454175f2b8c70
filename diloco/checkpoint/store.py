"""Checkpoints: a nested state written as named tensors (safetensors) plus JSON, checksummed.

Nothing is ever loaded with pickle: a checkpoint from someone else cannot run code. A state
(dicts, lists, tuples, numbers, strings, tensors, numpy arrays, as `state_dict()`s return them)
is split into its tensors, saved by name in one safetensors file, and a JSON tree of the rest
that refers to them; a sha256 over both is stored with them and checked on load, so a damaged
file is detected and skipped for the newest intact one (`newest_intact`).

Files are named `round-000012.safetensors` (the number of completed outer rounds) and written
atomically (`write_atomic`); the newest `keep` are kept. The file is written here, a tensor a
chunk at a time (`_write_safetensors`: the format's header, then each tensor's bytes), so that
a caller whose tensors live in files (`diloco/offload.py`) can drop each chunk from memory once
read (`after_read`); safetensors itself reads what it wrote.
safetensors: https://github.com/huggingface/safetensors
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from diloco.checkpoint.atomic import remove_strays, write_atomic

log = logging.getLogger(__name__)

_NAME = re.compile(r"^round-(\d{6,})\.safetensors$")
_OLD_NAME = re.compile(r"^round-(\d{6,})\.pt$")
_FORMAT = "diloco-checkpoint-1"
_CHUNK_BYTES = 4 << 20
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""torch dtype -> its name in a safetensors header (the dtypes a training state holds)."""

AfterRead = Callable[[torch.Tensor, int, int], None]
"""Called with a tensor and the range [start, end) of its elements just read."""


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read back exactly as it was written."""


def checkpoint_path(directory: Path, round: int) -> Path:
    return directory / f"round-{round:06d}.safetensors"


def save_checkpoint(
    directory: Path,
    round: int,
    state: dict[str, Any],
    keep: int,
    after_read: AfterRead | None = None,
) -> Path:
    """Write `state` as the checkpoint of `round` atomically; keep the newest `keep`.

    `after_read(tensor, start, end)` is called after each chunk of a tensor of `state` is read
    (twice per chunk: for the checksum, then for the file)."""
    remove_strays(directory)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    meta = json.dumps(tree, sort_keys=True)
    metadata = {"format": _FORMAT, "meta": meta, "sha256": _digest(meta, tensors, after_read)}
    final = write_atomic(
        checkpoint_path(directory, round),
        lambda path: _write_safetensors(path, tensors, metadata, after_read),
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


def _digest(
    meta: str, tensors: dict[str, torch.Tensor], after_read: AfterRead | None = None
) -> str:
    digest = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        for chunk in _chunks(tensor, after_read):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(tensor: torch.Tensor, after_read: AfterRead | None) -> Iterator[memoryview]:
    """The bytes of a contiguous `tensor`, `_CHUNK_BYTES` at a time (each element whole)."""
    size = tensor.element_size()
    raw = tensor.reshape(-1).view(torch.uint8)
    step = max(size, _CHUNK_BYTES // size * size)
    for start in range(0, raw.numel(), step):
        end = min(start + step, raw.numel())
        yield raw[start:end].numpy().data
        if after_read is not None:
            after_read(tensor, start // size, end // size)


def _write_safetensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    after_read: AfterRead | None,
) -> None:
    """A safetensors file: an 8-byte little-endian header size, the JSON header (each tensor's
    dtype, shape and [begin, end) in the data; the metadata), padded with spaces to 8 bytes,
    then every tensor's bytes back to back, in the header's order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"cannot checkpoint a tensor of {tensor.dtype} ({name})")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name in names:
            for chunk in _chunks(tensors[name].contiguous(), after_read):
                handle.write(chunk)


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
