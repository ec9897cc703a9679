"""The C allocator of a process that runs the model: freed memory kept for the next image.

glibc's malloc adapts two thresholds as a process runs: blocks above the mmap threshold get fresh
pages from the kernel and give them back when freed, and free memory at the top of a heap beyond
the trim threshold goes back to the kernel. A forward pass allocates and frees its activations
image after image, and in the model actors these stayed on the kernel's side of both thresholds:
every image faulted ~3,000 pages (12 MB) back in, and a quarter of each actor's CPU time went to the
kernel (BENCHMARKS.md: the allocator). Fixing both thresholds (blocks up to 32 MB from the heap,
up to 256 MB of free heap kept) ends that: the forward pass ran 1.45-1.6x faster in one process.
Either threshold alone does not (setting one also stops glibc adapting the other).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
TRIM_BYTES = 256 << 20
MMAP_BYTES = 32 << 20  # glibc's largest dynamic mmap threshold on 64-bit: larger blocks are still mapped
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Set this process's glibc malloc to keep freed memory (once; later calls return the first
    answer). False where the C library is not glibc (no `mallopt`) or refuses the values."""
    global _kept
    if _kept is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _kept = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept = bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES))
        log.debug("allocator: freed memory %s", "kept (glibc thresholds fixed)" if _kept else "handled by the C library's defaults")
    return _kept
