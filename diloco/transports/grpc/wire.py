"""How a shared state crosses the wire, both ways: a header listing its tensors, then bytes.

Nothing a header declares is trusted before it is checked: the number of tensors, their
names, dtypes and sizes are validated against the anchor's size before a byte is allocated.
Also the metadata keys every call carries.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from diloco.shared_state import SharedState
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc.state_keeper import CHUNK_BYTES

RANK_METADATA_KEY = "x-diloco-rank"
SESSION_METADATA_KEY = "x-diloco-session"

MAX_STATE_TENSORS = 16
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


def chunks_of(buffer: torch.Tensor) -> Iterator[pb.Chunk]:
    """`buffer`'s bytes (a contiguous CPU tensor) as data chunks."""
    view = memoryview(buffer.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    for start in range(0, len(view), CHUNK_BYTES):
        yield pb.Chunk(data=bytes(view[start : start + CHUNK_BYTES]))


def receive_bytes(
    chunks: Iterator[pb.Chunk], size: int, what: str, watch: Any = None
) -> torch.Tensor:
    """Exactly `size` bytes from data chunks into one uint8 tensor; ValueError otherwise.

    `watch` (a `guard.StreamWatch`) is touched at every chunk, so a stream that stalls is cut.
    """
    out = np.empty(size, dtype=np.uint8)
    filled = 0
    while filled < size:
        chunk = next(chunks, None)
        if chunk is None:
            break
        if watch is not None:
            watch.touch()
        if chunk.WhichOneof("kind") != "data":
            raise ValueError(f"{what}: expected data, got {chunk.WhichOneof('kind')}")
        end = filled + len(chunk.data)
        if end > size:
            raise ValueError(f"{what}: more than the {size} bytes announced")
        out[filled:end] = np.frombuffer(chunk.data, dtype=np.uint8)
        filled = end
    if filled != size:
        raise ValueError(f"{what}: {filled} bytes arrived of the {size} announced (truncated)")
    return torch.from_numpy(out)


def spec_of(name: str, tensor: torch.Tensor) -> pb.TensorSpec:
    dtype = str(tensor.dtype).removeprefix("torch.")
    return pb.TensorSpec(name=name, dtype=dtype, numel=tensor.numel())


def check_specs(header: Any) -> list[tuple[str, torch.dtype, int]]:
    """(name, dtype, numel) of each tensor a StateHeader announces, or ValueError.

    The first is the fp32 anchor of `header.numel` elements; the others are per element (the
    same numel) or scalars.
    """
    numel = int(header.numel)
    if numel <= 0:
        raise ValueError(f"a state needs a positive numel, got {numel}")
    specs = list(header.tensors)
    if not specs or len(specs) > MAX_STATE_TENSORS:
        raise ValueError(f"a state has 1 to {MAX_STATE_TENSORS} tensors, got {len(specs)}")
    checked = []
    for index, spec in enumerate(specs):
        if not _NAME.match(spec.name) or spec.dtype not in _DTYPES:
            raise ValueError(f"state tensor {spec.name!r} of dtype {spec.dtype!r} is not allowed")
        if spec.numel not in (numel, 1) or (index == 0 and spec.numel != numel):
            raise ValueError(f"state tensor {spec.name!r} has {spec.numel} elements, not {numel}")
        checked.append((spec.name, _DTYPES[spec.dtype], int(spec.numel)))
    if checked[0][:2] != ("anchor", torch.float32):
        raise ValueError("a state starts with its fp32 anchor")
    if len({name for name, _, _ in checked}) != len(checked):
        raise ValueError("a state names each tensor once")
    return checked


def receive_state(chunks: Iterator[Any], header: Any, watch: Any = None) -> SharedState:
    """The state a header announced, read from data chunks (ValueError if it does not fit)."""
    tensors = {}
    for name, dtype, numel in check_specs(header):
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        values = receive_bytes(chunks, nbytes, name, watch).view(dtype)
        # Per-element entries are flat vectors like the anchor; the others are scalars.
        tensors[name] = values if numel == header.numel else values.reshape(())
    anchor = tensors.pop("anchor")
    return SharedState(int(header.round), anchor, tensors)
