"""Exact similarity work on database rows that are read a block at a time, not held whole.

A quantized index's candidate lists are re-scored with the float rows (`refine`), and the recall
of approximate lists is measured against an exact search (`exact_topk`). Both only need the rows
a block at a time: `rows[a:b]` of any row source, a numpy array (a view: nothing copied) or a
reader of rows kept on disk (`pipelines.row_file.RowFile`, read into one reused buffer through
its `read_into(a, b, buffer)`: the graph stage's 10^6 x 128 float rows, 0.48 GiB, then stay out
of its memory). Each call passes once over the rows in blocks of `block_bytes`; the candidates
are grouped by block first (a counting sort of their ids), so each block is read once and every
candidate in it scored while it is in cache (numba, the GIL released, a thread per core for large
work). Contiguous float32 arrays are scored in one pass without blocks, by the same sum. Arrays
in, arrays out: reading is the row source's business.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .threads import in_ranges

BLOCK_BYTES = 32 << 20  # rows read per step: 65,536 rows of 128 float32


def block_rows(d: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows of dimension d in a block of `block_bytes` (at least one)."""
    return max(1, block_bytes // (4 * max(1, d)))


@njit(cache=True, nogil=True)
def _by_block(flat, rows_per_block, nblocks):
    """Counting sort of candidate positions by the block of their id: (order, starts); order[
    starts[b]:starts[b + 1]] are the positions into `flat` whose ids lie in block b (negative ids
    are left out)."""
    counts = np.zeros(nblocks + 1, np.int64)
    for p in range(flat.size):
        if flat[p] >= 0:
            counts[flat[p] // rows_per_block + 1] += 1
    starts = np.cumsum(counts)
    fill = starts[:-1].copy()
    order = np.empty(starts[-1], np.int64)
    for p in range(flat.size):
        if flat[p] >= 0:
            b = flat[p] // rows_per_block
            order[fill[b]] = p
            fill[b] += 1
    return order, starts


@njit(cache=True, nogil=True, fastmath=True)
def _dot(q, r):
    """float32 inner product, summed in one order for every caller (from a file or an array)."""
    acc = np.float32(0.0)
    for j in range(q.shape[0]):
        acc += q[j] * r[j]
    return acc


@njit(cache=True, nogil=True)
def _score(queries, rows, lo, flat, order, c, s0, s1, out):
    """out[p] = <queries[p // c], rows[flat[p] - lo]> for p in order[s0:s1]."""
    for t in range(s0, s1):
        p = order[t]
        out[p] = _dot(queries[p // c], rows[flat[p] - lo])


@njit(cache=True, nogil=True)
def _score_all(queries, rows, flat, c, p0, p1, out):
    """out[p] = <queries[p // c], rows[flat[p]]> for p in [p0, p1) where flat[p] >= 0 (rows in
    memory: no blocks)."""
    for p in range(p0, p1):
        if flat[p] >= 0:
            out[p] = _dot(queries[p // c], rows[flat[p]])


PARALLEL_MIN = 1 << 15  # fewer candidates than this are scored on the calling thread (starting threads costs more)


def _run(fn, m: int, threads: int | None) -> None:
    """fn(a, b) over [0, m): in a thread per core (`in_ranges`) for large m, else here."""
    if m < PARALLEL_MIN:
        fn(0, m)
    else:
        in_ranges(fn, m, threads)


def _block(rows, a: int, b: int, buffer: np.ndarray | None) -> np.ndarray:
    """rows[a:b] as contiguous float32: read into `buffer` by a source that can (`read_into`),
    else sliced (an array's view)."""
    if buffer is not None:
        return rows.read_into(a, b, buffer)
    return np.ascontiguousarray(rows[a:b], dtype=np.float32)


def candidate_scores(queries: np.ndarray, rows, ids: np.ndarray, *, block_bytes: int = BLOCK_BYTES,
                     threads: int | None = None) -> np.ndarray:
    """Inner products of each query with its candidate rows.

    Args:
        queries: (nq, d) contiguous float32. rows: a row source of (n, d) float32 (`rows.shape`,
            `rows[a:b]`), read once, a block at a time. ids: (nq, c) candidate rows (-1: none).
    Returns: (nq, c) float32 scores, -inf where the id is -1.
    """
    n, d = rows.shape
    nq, c = ids.shape
    if queries.shape != (nq, d):
        raise ValueError(f"candidate_scores: queries of shape {queries.shape} for {nq} lists over rows of dimension {d}")
    flat = np.ascontiguousarray(ids, dtype=np.int64).ravel()
    if flat.size and flat.max() >= n:
        raise ValueError(f"candidate_scores: candidate row {int(flat.max())} is past the database's {n} rows")
    out = np.full(flat.size, -np.inf, np.float32)
    if isinstance(rows, np.ndarray) and rows.dtype == np.float32 and rows.flags.c_contiguous:  # in memory: one pass, no blocks
        _run(lambda a, e: _score_all(queries, rows, flat, c, a, e, out), flat.size, threads)
        return out.reshape(nq, c)
    step = block_rows(d, block_bytes)
    order, starts = _by_block(flat, step, max(1, -(-n // step)))
    buffer = np.empty((min(step, n), d), np.float32) if hasattr(rows, "read_into") else None
    for b in range(len(starts) - 1):
        s0, s1 = int(starts[b]), int(starts[b + 1])
        if s0 == s1:
            continue
        lo = b * step
        block = _block(rows, lo, min(n, lo + step), buffer)
        _run(lambda a, e: _score(queries, block, lo, flat, order, c, s0 + a, s0 + e, out), s1 - s0, threads)
    return out.reshape(nq, c)


def refine(queries: np.ndarray, rows, ids: np.ndarray, k: int, *, block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-scoring of candidate lists against `rows` (see `candidate_scores`): the top k of
    each list by similarity (ties in candidate order). Returns (D, I) (nq, min(k, c)): float32
    descending (-inf where none) and ids of `ids`' dtype (-1 where none)."""
    S = candidate_scores(queries, rows, ids, block_bytes=block_bytes)
    k = min(int(k), ids.shape[1])
    top = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, top, 1), np.take_along_axis(ids, top, 1)


def exact_topk(queries: np.ndarray, rows, k: int, search, *, block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k of each query among all `rows`, a block at a time: search(queries, block, k)
    -> (D, I) block-local (e.g. `retrieval.knn.knn_search`), merged by similarity (ties: the lower
    row first). Returns (D, I) (nq, min(k, n)): float32 descending, int64 global ids."""
    n, d = rows.shape
    k = min(int(k), n)
    step = block_rows(d, block_bytes)
    buffer = np.empty((min(step, n), d), np.float32) if hasattr(rows, "read_into") else None
    D = np.full((len(queries), 0), -np.inf, np.float32)
    I = np.zeros((len(queries), 0), np.int64)
    for lo in range(0, n, step):
        Db, Ib = search(queries, _block(rows, lo, min(n, lo + step), buffer), k)
        D, I = np.concatenate([D, Db], 1), np.concatenate([I, np.where(Ib >= 0, Ib + lo, -1)], 1)
        top = np.argsort(-D, axis=1, kind="stable")[:, :k]
        D, I = np.take_along_axis(D, top, 1), np.take_along_axis(I, top, 1)
    return D, I
