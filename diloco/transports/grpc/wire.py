"""How a shared state crosses the wire, both ways: a header listing its tensors, then bytes.

Nothing a header declares is trusted before it is checked: the number of tensors, their
names, dtypes and sizes are validated against the anchor's size before a byte is allocated.
Where the size itself cannot be checked (a state offered to a group whose model's size is not
known), the receiver allocates at most UPFRONT_BYTES before the bytes arrive and grows the
buffer with what came (`grow=True`), so a declared size alone never costs memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diloco.shared_state import SharedState
from diloco.transports.grpc import coordinator_pb2 as pb
from diloco.transports.grpc.guard import StreamCut
from diloco.transports.grpc.state_keeper import CHUNK_BYTES

if TYPE_CHECKING:
    from diloco.transports.grpc.coordinator import RoundAnswer

MAX_STATE_TENSORS = 16
UPFRONT_BYTES = 64 << 20
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


def chunks_of(buffer: torch.Tensor) -> Iterator[pb.Chunk]:
    """`buffer`'s bytes (a contiguous CPU tensor) as data chunks."""
    view = memoryview(buffer.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    for start in range(0, len(view), CHUNK_BYTES):
        yield pb.Chunk(data=bytes(view[start : start + CHUNK_BYTES]))


def receive_bytes(
    chunks: Iterator[pb.Chunk], size: int, what: str, watch: Any = None, *, grow: bool = False
) -> torch.Tensor:
    """Exactly `size` bytes from data chunks into one uint8 tensor; ValueError otherwise.

    `watch` (a `guard.StreamWatch`) is touched at every chunk that carries bytes, so a stream
    that stalls, or sends empty chunks, is cut; a stream it cut raises StreamCut.
    """
    if size < 0:
        raise ValueError(f"{what}: a negative size {size}")
    out = np.empty(min(size, UPFRONT_BYTES) if grow else size, dtype=np.uint8)
    filled = 0
    while filled < size:
        chunk = next(chunks, None)
        if chunk is None:
            if watch is not None and watch.cut:
                raise StreamCut(f"{what}: cut after {filled} of {size} bytes")
            break
        if chunk.WhichOneof("kind") != "data":
            raise ValueError(f"{what}: expected data, got {chunk.WhichOneof('kind')}")
        end = filled + len(chunk.data)
        if end > size:
            raise ValueError(f"{what}: more than the {size} bytes announced")
        if end == filled:
            continue
        if watch is not None:
            watch.touch(end - filled)
        if end > len(out):  # grows with what arrived, never with what was declared
            grown = np.empty(min(size, max(end, 2 * len(out))), dtype=np.uint8)
            grown[:filled] = out[:filled]
            out = grown
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
        if not _NAME.fullmatch(spec.name) or spec.dtype not in _DTYPES:
            raise ValueError(
                f"state tensor {spec.name[:80]!r} of dtype {spec.dtype[:20]!r} is not allowed"
            )
        if spec.numel not in (numel, 1) or (index == 0 and spec.numel != numel):
            raise ValueError(f"state tensor {spec.name!r} has {spec.numel} elements, not {numel}")
        checked.append((spec.name, _DTYPES[spec.dtype], int(spec.numel)))
    if checked[0][:2] != ("anchor", torch.float32):
        raise ValueError("a state starts with its fp32 anchor")
    if len({name for name, _, _ in checked}) != len(checked):
        raise ValueError("a state names each tensor once")
    return checked


def state_bytes(specs: list[tuple[str, torch.dtype, int]]) -> int:
    """The bytes of the tensors `check_specs` returned."""
    return sum(numel * torch.empty((), dtype=dtype).element_size() for _, dtype, numel in specs)


def receive_state(
    chunks: Iterator[Any], header: Any, watch: Any = None, *, grow: bool = False
) -> SharedState:
    """The state a header announced, read from data chunks (ValueError if it does not fit);
    `grow`: its size was not checked against the group's (see `receive_bytes`)."""
    tensors = {}
    for name, dtype, numel in check_specs(header):
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        values = receive_bytes(chunks, nbytes, name, watch, grow=grow).view(dtype)
        # Per-element entries are flat vectors like the anchor; the others are scalars.
        tensors[name] = values if numel == header.numel else values.reshape(())
    anchor = tensors.pop("anchor")
    return SharedState(int(header.round), anchor, tensors)


def state_header(state: SharedState, sha: str, *, same: bool) -> pb.StateHeader:
    """The header of `state` as it is sent: what follows, tensor by tensor."""
    return pb.StateHeader(
        round=state.round,
        numel=state.anchor.numel(),
        params_sha256=sha,
        has_state=True,
        same=same,
        tensors=[spec_of(name, tensor) for name, tensor in state.tensors()],
    )


def state_nbytes(state: SharedState) -> int:
    """The bytes of every tensor of `state`."""
    return sum(t.numel() * t.element_size() for _, t in state.tensors())


def answer_parts(
    answer: RoundAnswer, read_chunks: Callable[[int], Iterator[bytes]]
) -> tuple[pb.Chunk, Iterator[pb.Chunk], int]:
    """(the header of an Average answer, its data chunks, their bytes): the mean, or the
    state to adopt read by `read_chunks(answer.generation)` from the keeper's one copy."""
    if answer.adopt is not None:
        state = answer.adopt
        size = state_nbytes(state)
        head = pb.AverageReply(
            round=state.round,
            participants=answer.participants,
            params_sha256=answer.params_sha256,
            payload_bytes=size,
            adopt=True,
            state=state_header(state, answer.params_sha256, same=False),
        )
        data = (pb.Chunk(data=piece) for piece in read_chunks(answer.generation))
        return pb.Chunk(reply=head), data, size
    assert answer.mean_payload is not None
    head = pb.AverageReply(
        round=answer.round,
        participants=answer.participants,
        params_sha256=answer.params_sha256,
        payload_bytes=answer.mean_payload.numel(),
        late=answer.late,
    )
    return pb.Chunk(reply=head), chunks_of(answer.mean_payload.cpu()), answer.mean_payload.numel()
