"""Keeping a long slide run's memory flat.

glibc raises its mmap threshold each time a large block is freed, so the many short-lived
buffers of a slide's chunks (crops, activations) end up on the heap, which keeps its peak and
grows with the number of chunks (docs/BENCHMARKS.md compares the peak with and without this, via
``SEGTHENSEG_HEAP_FIX=0``). Fixing the threshold (large blocks always mapped, and so always
returned) is what ``MALLOC_MMAP_THRESHOLD_=131072`` does from the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 128 * 1024  # glibc's default starting value, kept fixed


def keep_heap_small() -> bool:
    """Fix glibc's mmap threshold for this process; False where there is no glibc (macOS, Windows)."""
    if not sys.platform.startswith("linux") or os.environ.get("SEGTHENSEG_HEAP_FIX") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
