"""Exact search speed per batch size: faiss's flat index (with its own BLAS threshold and with the
project's) against the blocked product + partial sort. Run as the scale benchmark's `knn` step:

    python -m pipelines.benchmarks.scale knn --n 100000 --out runs/scale
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("scale")


def step_knn(out: Path, grid: tuple[tuple[int, int], ...] = ((1, 10), (4, 10), (16, 10), (256, 10), (256, 1000), (1000, 10), (1000, 1000)),
             repeats: int = 3) -> dict:
    """Exact search, ms per call, per (queries, k): faiss's flat index with its own BLAS threshold
    and with the project's (`retrieval.knn.FLAT_BLAS_THRESHOLD`), and the blocked product +
    partial sort (`retrieval.knn.exact_search`): the measurement behind KnnRanker's choice."""
    from retrieval.knn import (
        FAISS_DEFAULT_BLAS_THRESHOLD, FLAT_BLAS_THRESHOLD, IndexSpec, build_index, exact_search, search_index, set_flat_blas_threshold,
    )

    X, Q = np.load(out / "X.npy"), np.load(out / "Q.npy")
    index = build_index(X, IndexSpec("flat"))
    rows = []

    def faiss_with(threshold: int):
        def search():
            set_flat_blas_threshold(threshold)
            try:
                return search_index(index, q, k)
            finally:
                set_flat_blas_threshold(FLAT_BLAS_THRESHOLD)
        return search

    for nq, k in grid:
        q = Q[:nq]
        row = {"queries": nq, "k": k}
        for name, fn in (("faiss_default_ms", faiss_with(FAISS_DEFAULT_BLAS_THRESHOLD)), ("faiss_ms", faiss_with(FLAT_BLAS_THRESHOLD)),
                         ("blocked_ms", lambda: exact_search(q, X, k))):
            fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            row[name] = (time.perf_counter() - t0) / repeats * 1000
        log.info("knn %4d queries k %4d: faiss %.1f ms (its default BLAS threshold %.1f ms), blocked %.1f ms", nq, k, row["faiss_ms"],
                 row["faiss_default_ms"], row["blocked_ms"])
        rows.append(row)
    return {"knn": rows}
