"""Memory of freed tensors kept for the next step, where the C library is glibc (Linux).

glibc serves every allocation above its threshold (128 KiB, rising to at most 32 MiB) with a mapping of its own
and hands it back to the kernel when it is freed. A training step allocates and frees the same large tensors
every time (the logits of one 20x24x22 scale, 10,560 positions x 512 codes x batch 4, are 86 MB), so every step
pays a page fault per 4 KiB page and the kernel's zeroing of each page again: about a fifth of the study's NeuroAR
CPU time (`benchmarks/DEMO_BUDGET.md`). Served from the heap instead, and freed memory kept there, the next step
reuses it (measured: `benchmarks/NEUROAR_STEP.md`). The price is a higher peak of resident memory (freed memory
is not handed back).
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters, from glibc's malloc.h
_KEEP_BYTES = 2**31 - 1  # free memory at the heap's top kept up to this size (mallopt takes an int)


def reuse_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory there, for this process. Returns whether it took
    effect: False where the C library is not glibc (macOS, Windows, musl), which then stays as it was."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
