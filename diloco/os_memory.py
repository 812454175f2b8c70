"""Freed buffers given back to the operating system (glibc's malloc on Linux; elsewhere
nothing changes).

A long-running coordinator fixes malloc's mmap threshold (`return_freed_buffers_to_the_os`).
glibc's malloc serves a request of at least its mmap threshold with a mapping of its own, which
`free` unmaps at once; smaller ones come from heaps that keep what is freed for reuse. The
threshold is dynamic: each time a mapped block is freed it rises to that block's size (up to
32 MiB), so after the first rounds every buffer up to 32 MiB (the data plane's chunk buffers,
grpc's messages, a small model's means) lands in heaps that one thread per stream fragments and
never trims. Measured with `bench/grpc_memory.py` (docs/results/streaming.md, "Memory"): a
coordinator's RSS above its baseline was 14.6x its payload at 8M parameters and 3.6x at 64M,
against 3.9x and 3.2x with the threshold fixed at 1 MiB. Only the standalone coordinator sets
it: an island's inner loop allocates many tensors above 1 MiB every step, and torch's CPU
allocator keeps no cache of its own, so there each one would be a new mapping and its page
faults.

An island instead trims its heaps once a round, as its sync begins (`trim_heaps`; for
payloads of `TRIM_FROM_BYTES` and more): the inner
loop's freed gradients of layers under 32 MiB may still sit there, resident through the sync,
which then held 1x its payload more in some runs (64M parameters in 16 tensors: the sync's
peak 6.4x to 7.96x its payload above the baseline over five runs, 6.40x to 6.45x with the
trim). The next inner step faults those pages in again, once a round.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20
"""Blocks from this size up are mapped on their own and unmapped when freed."""


def return_freed_buffers_to_the_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix malloc's mmap threshold at `threshold_bytes` for this process (glibc on Linux).

    Returns:
        Whether it was set; False elsewhere (another libc or system: nothing changes).
    """
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused: freed buffers may stay in the heap")
    return done


TRIM_FROM_BYTES = 64 << 20
"""Payloads from this size up trim the heaps at each sync: below it, what a trim could give back
is tens of MiB at most, and a run that syncs every step (H = 1) would fault those pages in
again every step (5 % of a small model's plain-AdamW run, measured)."""


def trim_heaps() -> bool:
    """Give the free pages of malloc's heaps back to the OS (glibc's malloc_trim(0)).

    Returns:
        Whether malloc_trim ran; False elsewhere (another libc or system: nothing changes).
    """
    malloc_trim = _glibc("malloc_trim", [ctypes.c_size_t])
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def _glibc(name: str, argtypes: list[type]) -> Any:
    """The C library's function `name` (returning an int) on Linux; None elsewhere, or where
    the library has no such function."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function
