"""Row ranges run in a thread each: how the compiled (numba, GIL released) passes over kNN
lists use the cores without a second threading layer."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


def in_ranges(fn: Callable[[int, int], None], n: int, threads: int | None = None) -> None:
    """fn(r0, r1) over `threads` contiguous near-equal ranges of [0, n) (default: one per core),
    concurrently; exceptions propagate. fn must release the GIL (numba `nogil=True`) to run in
    parallel."""
    threads = max(1, min(threads or os.cpu_count() or 1, n or 1))
    cuts = [n * t // threads for t in range(threads + 1)]
    if threads == 1:
        fn(0, n)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: fn(cuts[t], cuts[t + 1]), range(threads)))


def blas_threads(limit: int):
    """Context manager: the BLAS libraries loaded (numpy's, faiss's) use at most `limit` threads
    inside it (threadpoolctl; the one place this project changes them)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=limit, user_api="blas")
