"""The outer optimizer's state in files between outer steps (`outer.offload_state`).

An island needs the outer momentum once a round, in its outer step; a coordinator in its outer
step and when it serves the state. Between those uses the momentum is a model-sized vector
that nothing reads: kept in a file it leaves the process's memory, one model's size less in
every phase of an island's round (the training steps and the sync: issue 14's memory bar) and
on a coordinator, for one write and one read of the vector per round.

Each per-element tensor of the state lives in a file mapped into memory (MAP_SHARED), so every
torch operation reads and writes it as any tensor, bit for bit the same arithmetic; `release`
writes a range back to the file and drops it from the process (madvise) and from the page
cache (posix_fadvise): the bytes are on the disk, not in memory. The outer step runs a slice
at a time (`step_in_slices`), each slice released once stepped, so the step holds one slice of
the state, not the whole vector. The folder must be on a disk: on a tmpfs (/dev/shm, often
/tmp) the file is memory itself.

Only optimizers whose state is all per element can step in slices (SGD's momentum; Adam's
step count is a scalar a slice-wise step would advance once per slice): `check_sliceable`.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from diloco.shared_state import OuterOptimizer

SLICE = 1 << 22
"""Elements of each state vector stepped (and resident) at once: 16 MiB of fp32, a multiple of
the outer step's own chunk (diloco/outer/nesterov.py), so slice-wise steps take the same
chunks, and the same bits, as a step over the whole vector."""

SLICEABLE_OPTIMIZERS = ("sgd",)


def check_sliceable(optimizer: OuterOptimizer) -> None:
    """Raise ValueError unless `optimizer`'s state is all per element (it can step in slices)."""
    if optimizer.name not in SLICEABLE_OPTIMIZERS:
        raise ValueError(
            f"the outer state can be kept on disk with outer.optimizer "
            f"{' or '.join(SLICEABLE_OPTIMIZERS)} only, not {optimizer.name} (its state has "
            "scalars, which a step taken a slice at a time would advance once per slice)"
        )


class FileVector:
    """A flat fp32 vector in a file, mapped into memory: `tensor` is an ordinary CPU tensor."""

    def __init__(self, path: Path, numel: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.numel = numel
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        nbytes = max(4 * numel, mmap.PAGESIZE)  # a mapping is never empty
        os.ftruncate(self._fd, nbytes)  # zeros
        _reserve(self._fd, nbytes, path)
        self._map = mmap.mmap(self._fd, nbytes)  # MAP_SHARED: writes land in the file
        self.tensor = torch.frombuffer(self._map, dtype=torch.float32, count=numel)

    def release(self, start: int = 0, end: int | None = None) -> None:
        """Write elements [start, end) back to the file and drop them from memory (whole pages:
        a neighbour's partial page is written and dropped too, and read again when used)."""
        end = self.numel if end is None else end
        if end <= start:
            return
        page = mmap.PAGESIZE
        first = (4 * start) // page * page
        length = min(-(-(4 * end) // page) * page, len(self._map)) - first
        self._map.flush(first, length)  # msync: the file holds the bytes before they go
        self._map.madvise(mmap.MADV_DONTNEED, first, length)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, first, length, os.POSIX_FADV_DONTNEED)


class OffloadedState:
    """The per-element tensors of an outer state, each in a `FileVector` under `folder`.

    `state` is the dict the outer optimizer steps: its per-element entries are replaced by the
    file-backed tensors (scalars, if any, stay in memory), so the holder keeps using its dict.
    """

    def __init__(self, folder: Path, state: dict[str, torch.Tensor], numel: int):
        self.folder = folder
        self.numel = numel
        self.state = state
        self.files: dict[str, FileVector] = {}
        self.load(dict(state))

    def load(self, values: Mapping[str, torch.Tensor]) -> None:
        """Take `values` as the state: per-element ones are copied into their files."""
        values = dict(values)  # `values` may be the dict it replaces
        self.state.clear()
        for name, value in values.items():
            if value.numel() != self.numel or self.numel == 1:
                self.state[name] = value.detach().to("cpu").clone()
                continue
            vector = self.files.get(name)
            if vector is None:
                vector = self.files[name] = FileVector(self.folder / f"{name}.f32", self.numel)
            for start, end in slices(self.numel):
                vector.tensor[start:end].copy_(value.reshape(-1)[start:end])
                vector.release(start, end)
            self.state[name] = vector.tensor

    def release(self) -> None:
        """Drop every file-backed tensor from memory (whatever read it since: a checkpoint, a
        download of the state)."""
        for vector in self.files.values():
            vector.release()

    def release_read(self, tensor: torch.Tensor, start: int, end: int) -> None:
        """Drop elements [start, end) of `tensor` from memory if it is one of the files' (a
        reader's hook: `diloco.checkpoint.save_checkpoint`'s `after_read`, a download)."""
        for vector in self.files.values():
            if vector.tensor.data_ptr() == tensor.data_ptr():
                vector.release(start, min(end, vector.numel))

    def copies(self) -> dict[str, torch.Tensor]:
        """The state in memory (a checkpoint's copy), the files dropped again once read."""
        copied = {name: tensor.clone() for name, tensor in self.state.items()}
        self.release()
        return copied

    def step_in_slices(
        self,
        optimizer: OuterOptimizer,
        anchor_N: torch.Tensor,
        mean_N: torch.Tensor,
        round: int,
    ) -> None:
        """`optimizer.step_` over the whole state, a `SLICE` at a time, each slice of the files
        released once stepped: the same bits as one step (elementwise, at the same chunks)."""
        for start, end in slices(self.numel):
            sliced = {
                name: tensor[start:end] if name in self.files else tensor
                for name, tensor in self.state.items()
            }
            optimizer.step_(anchor_N[start:end], mean_N[start:end], sliced, round)
            for vector in self.files.values():
                vector.release(start, end)


def _reserve(fd: int, nbytes: int, path: Path) -> None:
    """Allocate the file's blocks now: a write through the mapping to a full disk would kill
    the process (SIGBUS) in the middle of a round; this fails here, saying so."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
            return
        os.close(fd)
        raise OSError(
            error.errno,
            f"cannot reserve {nbytes / 2**20:.0f} MiB for the outer state in {path} "
            f"(outer.offload_state): {error.strerror}",
        ) from None


def slices(numel: int, size: int | None = None) -> Iterator[tuple[int, int]]:
    """[start, end) of consecutive slices of `size` (default `SLICE`) elements covering `numel`."""
    size = SLICE if size is None else size
    for start in range(0, numel, size):
        yield start, min(start + size, numel)
