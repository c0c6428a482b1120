"""Keeping a long slide run's memory flat.

glibc raises its mmap threshold each time a large block is freed, so the many short-lived
buffers of a slide's chunks (crops, activations) end up on the heap, which keeps its peak: on a
8192 px slide the resident size grew from 0.5 to 1.3 GB over 52 chunks, and stayed at 0.4 GB with
the threshold fixed (docs/BENCHMARKS.md). Fixing it (large blocks always mapped, and so always
returned) is what ``MALLOC_MMAP_THRESHOLD_=131072`` does from the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 128 * 1024  # glibc's default starting value, kept fixed


def keep_heap_small() -> bool:
    """Fix glibc's mmap threshold for this process; False where there is no glibc (macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
