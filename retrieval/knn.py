"""k-nearest-neighbour search by inner product (faiss), with a numpy brute-force reference."""
from __future__ import annotations

import logging

import faiss
import numpy as np

log = logging.getLogger(__name__)


def _as_f32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{name} has {bad.size} rows with NaN/inf values (first: {bad[:5].tolist()})")
    return x


def knn_search(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with faiss IndexFlatIP.

    Args:
        queries: (nq, d) float32. database: (n, d) float32.
        k: neighbours per query; clipped to n.
    Returns: (D, I): (nq, k) float32 similarities (descending) and (nq, k) int64 database indices.
    """
    q = _as_f32(queries, "queries")
    x = _as_f32(database, "database")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"dimension mismatch: queries d={q.shape[1]}, database d={x.shape[1]}")
    k = min(int(k), x.shape[0])
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    D, I = index.search(q, k)
    return D, I.astype(np.int64)


def knn_search_numpy(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference for `knn_search` (same shapes; ties broken by lower index)."""
    q = _as_f32(queries, "queries")
    x = _as_f32(database, "database")
    k = min(int(k), x.shape[0])
    S = q @ x.T
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, I, axis=1), I.astype(np.int64)


def full_ranking(queries: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All database items ranked per query: (nq, n) float32 scores and (nq, n) int64 indices."""
    return knn_search(queries, database, database.shape[0])
