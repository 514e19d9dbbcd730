"""Keep the C heap's freed memory for reuse while training.

A training step allocates and frees the same large buffers every step: activations saved for backward, their
gradients, the logits, the optimizer's temporaries. PyTorch's CPU allocator hands each one to malloc and back.
glibc's malloc serves blocks above its mmap threshold (128 KB, adjusted up to 32 MB) with a fresh mmap and returns
them with munmap, and trims the heap's free top back to the system: so every step touches hundreds of MB of brand-new
pages, each a page fault the kernel must zero (~150,000 faults, about a fifth of the train-small step, measured in
BENCHMARKS.md). With mmap off and trimming raised, freed blocks stay in the heap and the next step reuses them
warm. This is what jemalloc/tcmalloc preloading buys PyTorch CPU training, done in-process with glibc's own mallopt.

The cost: the process keeps its peak heap instead of handing freed memory back, which a trainer reaches every step
anyway. Inference processes are left alone (the engine and the server release memory on purpose).
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc's <malloc.h> parameter numbers
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only a free heap top above 2 GB
TOP_PAD = 256 << 20  # grow the heap 256 MB past each request (address space only until touched)
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "LD_PRELOAD")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (no mmap per large block, no trimming below 2 GB of free heap
    top). Returns whether the setting is in effect. A no-op (False) where the C library is not glibc, and where the
    user chose for themselves: a MALLOC_* tuning variable or an LD_PRELOAD (jemalloc, tcmalloc) in the environment.
    Set DSV2_KEEP_FREED_MEMORY=0 to turn it off. Idempotent: the first call decides for the process."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("DSV2_KEEP_FREED_MEMORY", "1") == "0" or any(os.environ.get(k) for k in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt (if any) take other numbers
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; in effect means all three took
    return all([mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD), mallopt(M_TOP_PAD, TOP_PAD)])
