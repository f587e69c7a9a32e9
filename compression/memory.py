"""Returning freed memory to the operating system between search episodes.

Every episode builds a differently pruned copy of the model, runs it, and drops it. glibc's allocator keeps
the freed blocks (in its heap and per-thread arenas, fragmented by the ever-changing tensor sizes) instead of
returning them, so a search process's resident memory grew by ~25 MB per episode: a random search of
ResNet-20 on digits reached 1.84 GB after 60 episodes, against 0.57 GB when ``malloc_trim(0)`` runs after
each episode (measured in session 2; ``bench/memory.py`` records the growth with episode count). A worker
running thousand-episode searches would otherwise be killed for memory it does not use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None | bool = None


def release_freed_memory() -> bool:
    """Ask the C allocator to return freed memory to the OS; False where that is not possible (not glibc)."""
    global _trim
    if _trim is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _trim = libc.malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if not _trim:
        return False
    _trim(0)  # type: ignore[operator]
    return True
