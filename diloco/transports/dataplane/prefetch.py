"""Reading one participant's stream a chunk ahead, so the network overlaps the arithmetic.

The accumulator consumes chunk j of every participant in rank order; a `PrefetchedSections`
reader thread per participant meanwhile fills chunk j + 1 (at most `depth` chunks ahead), so
socket reads and TLS decryption (both release the GIL) run while the previous chunk is decoded
and added (torch and the numba kernels release it too), and the participants' decryption runs
on as many cores as there are. Memory: `depth` chunk buffers per participant; a participant
cannot run further ahead, so TCP backpressure still holds each sender. `InlineSections` is
the same interface without a thread: chunk j is read when asked for, in rank order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

import torch

from diloco.codecs.base import empty

_CPU = torch.device("cpu")
# How often a reader waiting for a free buffer checks whether it should stop.
_POLL_S = 0.1

Read = Callable[[torch.Tensor], None]
"""Fill the given uint8 tensor from the participant's stream, or raise."""


class InlineSections:
    """Chunk after chunk, read when asked for, into one reused buffer."""

    def __init__(self, read: Read, sizes: Sequence[int]):
        self._read, self._sizes, self._next = read, list(sizes), 0
        self._buffer = empty(max(self._sizes, default=0), torch.uint8, _CPU)

    def next(self) -> torch.Tensor:
        section = self._buffer[: self._sizes[self._next]]
        self._next += 1
        self._read(section)
        return section

    def release(self) -> None:
        """The last section given may be overwritten now."""

    def close(self) -> None:
        """Nothing runs in the background."""


class PrefetchedSections:
    """Chunk after chunk, read by a thread of its own up to `depth` chunks ahead."""

    def __init__(self, read: Read, sizes: Sequence[int], depth: int = 2):
        self._read, self._sizes = read, list(sizes)
        most = max(self._sizes, default=0)
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(depth):
            self._free.put(empty(most, torch.uint8, _CPU))
        self._filled: queue.Queue[torch.Tensor | BaseException] = queue.Queue()
        self._given: list[torch.Tensor] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True, name="dataplane-read")
        self._thread.start()

    def next(self) -> torch.Tensor:
        """The next section's bytes; raises what the read raised."""
        item = self._filled.get()
        if isinstance(item, BaseException):
            raise item
        self._given.append(item)
        return item

    def release(self) -> None:
        """Every section given so far may be overwritten now."""
        for section in self._given:
            self._free.put(section)
        self._given.clear()

    def close(self) -> None:
        """Stop reading ahead and wait for the thread: a stream must never be read by two
        threads at once (an SSL object is not thread-safe). A read in progress ends with its
        own timeouts."""
        self._stop.set()
        self._thread.join()

    def _fill(self) -> None:
        for size in self._sizes:
            buffer = self._take_free()
            if buffer is None:
                return
            section = buffer[:size]
            try:
                self._read(section)
            except BaseException as error:  # handed to the consumer, which raises it
                self._filled.put(error)
                return
            self._filled.put(section)

    def _take_free(self) -> torch.Tensor | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None
