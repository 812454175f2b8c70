"""Unit tests run torch on one intra-op thread.

Their tensors are tiny, so extra threads only add synchronisation; on a loaded machine with
few cores the OpenMP workers spin against other processes and a tiny GPT step takes
hundreds of milliseconds instead of a few (measured: 20 steps 5 s with 2 threads, 0.1 s
with 1).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
