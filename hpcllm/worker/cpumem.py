"""Keep freed heap memory in a process that steps a model on CPU (glibc's mallopt).

A CPU step allocates and frees the same large activations every step: each layer's gathered keys and values of a
prefill chunk, a 512-token chunk's MLP output (tens of MB for a 7B model), SDPA's outputs. glibc serves an
allocation above its mmap threshold (128 KiB at start, raised to at most 32 MiB as such blocks are freed) with a
fresh mmap and gives it back on free, and it trims the heap's top when more than its trim threshold lies free: both
mean the next step's allocation faults its pages in again, one by one (page faults dominate on these VMs,
../shared/notes/loading-on-these-machines.md). vLLM's CPU backend asks for tcmalloc for the same reason. Raising
both thresholds once keeps the process's high-water mark of activations mapped and reused instead: a step of 55
long-context decodes and a 500-token prefill, 117 -> 94 ms on the dev VM (bench/step_memory.py). The cost is that
the process keeps, as free heap, the largest step's activations, which the next large step needs anyway.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): larger blocks are always mapped.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # mallopt takes an int: free heap top below 2 GiB is kept

_applied: str | None = None


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds for this process (once); says what was done, or why nothing was."""
    global _applied
    if _applied is None:
        _applied = _apply()
        log.info("CPU step memory: %s", _applied)
    return _applied


def _apply() -> str:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "not glibc (no mallopt): allocator left as it is"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        return "glibc refused the thresholds: allocator left as it is"
    return (f"freed blocks up to {MMAP_THRESHOLD_BYTES >> 20} MiB stay on the heap and the heap is not trimmed "
            f"below {TRIM_THRESHOLD_BYTES >> 20} MiB free")
