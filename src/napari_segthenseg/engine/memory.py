"""Keeping a long slide run's memory flat.

glibc raises its mmap threshold each time a large block is freed, so the many short-lived
buffers of a slide's chunks (crops, activations) end up on the heap, and the freed heap is not
given back: the resident size grows with the number of chunks (docs/BENCHMARKS.md compares the
peak with and without this, via ``SEGTHENSEG_HEAP_FIX=0``). Handing the free heap back after each
chunk and rough tile (``malloc_trim``) bounds it at one chunk's need; fixing the threshold instead
bounded it too but cost 40 % more CPU time in page faults (measured on the 8,192 px slide).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or os.environ.get("SEGTHENSEG_HEAP_FIX") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system; False where there is no glibc."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
