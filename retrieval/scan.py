"""Inner products of a few queries with every database row, in one pass over the database.

BLAS's matrix product with a handful of query rows runs far from the cost of reading the database
once (10^5 x 128 float32: 6.3-6.6 ms for 2 to 8 queries against 2.0 ms for one): `scan_scores`
reads each database row once and takes its dot products with all the queries while it is in cache,
one row range per thread (2 queries 2.2 ms, 8 queries 3.5 ms; BENCHMARKS.md). For up to SCAN_MAX
queries; more go to BLAS.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit

from .threads import Workers

SCAN_MAX = 16  # up to this many queries a scan beats BLAS's product (BENCHMARKS.md)


@functools.cache
def _workers() -> Workers:
    """The scan's threads, started on its first use and kept."""
    return Workers()


@njit(cache=True, nogil=True, fastmath=True)
def _scan(Q, X, S, r0, r1):
    """S[:, r0:r1] = Q @ X[r0:r1].T, each row of X read once."""
    nq, d = Q.shape
    for i in range(r0, r1):
        for q in range(nq):
            acc = np.float32(0.0)
            for j in range(d):
                acc += Q[q, j] * X[i, j]
            S[q, i] = acc


def scan_scores(Q: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Q (nq, d) and X (n, d) contiguous float32 -> Q @ X.T (nq, n) float32, in one pass over X
    split into one row range per core (a kept pool of threads; the kernel releases the GIL)."""
    workers = _workers()
    n = X.shape[0]
    S = np.empty((Q.shape[0], n), np.float32)
    cuts = [n * t // workers.threads for t in range(workers.threads + 1)]
    workers.map(lambda r0, r1: _scan(Q, X, S, r0, r1), cuts[:-1], cuts[1:])
    return S
