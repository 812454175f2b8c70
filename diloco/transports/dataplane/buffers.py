"""Round buffers the coordinator hands out again once nothing reads them.

Each round's encoded mean is a model-sized buffer. Allocated afresh every round, its pages are
faulted in (and zeroed by the kernel) on first write: 13-150 ms for 100 MB on the 2-core VM of
docs/results/streaming.md (perf: `clear_page_erms` under the accumulator's first add), about
what the mean's arithmetic costs. A buffer taken again from the last round is already mapped.

A buffer is free when no tensor, view, numpy array or memoryview of it is left: every one of
those holds the buffer's numpy array (torch.from_numpy keeps it as the storage's owner), so
its reference count falls back to the pool's own. That is CPython's count, exact in the
default build; it is never decremented late, so a buffer in use is never handed out.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch


def _count_in_list(arrays: list[np.ndarray], index: int) -> int:
    return sys.getrefcount(arrays[index])


# What `_count_in_list` reads for an array only the list holds (2 in CPython 3.11-3.13: the
# list's reference and the call's), measured rather than assumed, as interpreters differ.
_POOL_REFERENCES = _count_in_list([np.empty(0, dtype=np.uint8)], 0)


class ReusedBuffers:
    """Flat uint8 CPU buffers by size; at most `keep` are held between uses."""

    def __init__(self, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 tensor of `nbytes`: a held buffer nothing reads any more,
        else a new one (held if there is room; else a free held one of another size makes
        room for it)."""
        with self._lock:
            for index in range(len(self._arrays)):
                if self._arrays[index].nbytes == nbytes and self._free(index):
                    return torch.from_numpy(self._arrays[index])
            array = np.empty(nbytes, dtype=np.uint8)  # huge pages: codecs/base.py `empty`
            if len(self._arrays) >= self.keep:
                spare = [i for i in range(len(self._arrays)) if self._free(i)]
                if not spare:
                    return torch.from_numpy(array)  # every held one is in use: not held
                del self._arrays[spare[0]]
            self._arrays.append(array)
            return torch.from_numpy(array)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(array.nbytes for array in self._arrays)

    def _free(self, index: int) -> bool:
        return _count_in_list(self._arrays, index) == _POOL_REFERENCES
