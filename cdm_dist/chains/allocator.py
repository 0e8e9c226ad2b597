"""The CPU allocator's settings for the chain loop: keep large freed blocks for reuse instead of returning them.

A step allocates and frees temporaries of a few megabytes (kernel blocks, activations). glibc's malloc serves such
sizes with fresh mmap'd pages and returns them on free, so every step pays page faults and zeroing for each: on the
2-core CPU that doubled a step's time (`cdm bench engine`). Raising the mmap and trim thresholds (mallopt) makes it
reuse its heap instead, as jemalloc or tcmalloc would; a process then keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above 32 MB still come from mmap
TRIM_THRESHOLD = 1 << 30  # return memory to the system only past 1 GB of free heap top
SWITCH = "CDM_KEEP_ALLOCATIONS"  # "0": leave malloc as it is


@functools.cache
def keep_large_allocations() -> bool:
    """Set glibc malloc's mmap and trim thresholds once per process; False where malloc is not glibc's, or the
    environment says "0"."""
    if os.environ.get(SWITCH, "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
