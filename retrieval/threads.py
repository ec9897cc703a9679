"""Threads for the compiled (numba, GIL released) passes: row ranges in a thread each for one-off
passes over kNN lists (`in_ranges`), and a kept pool (`Workers`) for per-call work too short to
start threads for (a product of block CG, a chunk of queries): one threading layer, no other."""
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


class Workers:
    """`threads` threads kept for the life of their owner (default: one per core); `map(fn, *its)`
    runs fn over the items concurrently and returns the results in order (inline when one thread or
    one item: no hand-off for a single query)."""

    def __init__(self, threads: int | None = None):
        self.threads = max(1, threads or os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def map(self, fn: Callable, *iterables) -> list:
        items = list(zip(*iterables))
        if self._pool is None or len(items) <= 1:
            return [fn(*args) for args in items]
        return list(self._pool.map(lambda args: fn(*args), items))

    def map_ranges(self, fn: Callable[[int, int], object], n: int, chunk: int) -> list:
        """fn(a, b) over consecutive ranges [a, b) of [0, n) of at most `chunk` rows, results in
        order; fewer rows than threads x chunk are split so each thread gets a range (a service's
        few queries: one each)."""
        size = max(1, min(chunk, -(-n // self.threads)))
        starts = range(0, n, size)
        return self.map(fn, starts, [min(a + size, n) for a in starts])


def blas_threads(limit: int):
    """Context manager: the BLAS libraries loaded (numpy's, faiss's) use at most `limit` threads
    inside it (threadpoolctl; the one place this project changes them)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=limit, user_api="blas")
