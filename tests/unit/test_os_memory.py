"""Freed buffers go back to the OS (diloco/os_memory.py): a standalone coordinator fixes
malloc's mmap threshold, an island trims its heaps as each sync begins.

Each case runs in a process of its own: the setting is process-wide.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc on Linux")

PROBE = """
import re, sys
from diloco.os_memory import return_freed_buffers_to_the_os, trim_heaps

def rss_kib():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1))

if sys.argv[1] == "fixed":
    assert return_freed_buffers_to_the_os()
big = b"\\x01" * (16 << 20)  # freeing a 16 MiB mapping raises glibc's dynamic threshold to it
del big
held = b"\\x01" * (8 << 20)  # below it now: from the heap, unless the threshold is fixed
before = rss_kib()
del held
if sys.argv[1] == "trim":
    assert trim_heaps()
print(before - rss_kib())
"""


def freed_kib(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def test_a_freed_buffer_of_a_few_mib_leaves_the_resident_set() -> None:
    if freed_kib("default") > 4096:
        pytest.skip("this libc returns such buffers by itself: nothing to compare")
    assert freed_kib("fixed") >= 7 * 1024  # the 8 MiB buffer, its pages given back


def test_trimming_the_heaps_gives_a_freed_heap_block_back() -> None:
    if freed_kib("default") > 4096:
        pytest.skip("this libc returns such buffers by itself: nothing to compare")
    assert freed_kib("trim") >= 7 * 1024
