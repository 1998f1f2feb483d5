"""Fewer glibc malloc arenas for the worker process.

glibc gives each thread that allocates its own malloc arena (up to 8 per core), and an arena keeps the memory
freed in it.  The worker's RocksDB background threads (flushes and compactions of the dedup stores, busy once
ids start to expire) each grew one: in the default-settings soak the worker's RSS rose by ~100-150 MB when
expiry began, and stayed there.  Two arenas are enough for one event loop and a few helper threads; measured,
see docs/performance.md (soak).  A ``MALLOC_ARENA_MAX`` in the environment wins; other C libraries are left
alone.
"""

from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
ARENAS = 2


def limit_arenas(n: int = ARENAS) -> bool:
    """Cap this process's malloc arenas at ``n`` (before its threads start); whether it was done."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_ARENA_MAX, n) == 1
