"""Database-side truncated diffusion (the offline step of Iscen et al., CVPR 2017): every database
item's diffusion from itself, computed once and kept as a sparse row of its `keep` strongest
entries; a new query is then a kNN search for its kq seeds and a weighted sum of their rows.

Diffusion is linear: the solution of (I - alpha W) x = sum_j y_j e_j is sum_j y_j x_j, where x_j
solves (I - alpha W) x_j = e_j. Summing the seeds' rows, weighted by y_j = s_j^gamma, therefore
ranks as the query's own diffusion would, up to each row's truncation (its subgraph of m nodes
chosen by mass, `retrieval.truncated_compiled`, and the `keep` entries kept). The online cost no
longer depends on the graph: kq rows of `keep` entries are gathered and the top k of their sum
sorted, in compiled code.

Rows are float32 values and int32 columns, `keep` per item at most: n * keep * 8 bytes
(10^5 items, keep 700: 530 MB). They can be produced a chunk at a time (`item_row_chunks`) and
ranked from memory-mapped files (any arrays will do), so neither the offline step nor a process
that ranks needs the table in its own memory.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from numba import njit

from .threads import Workers


@dataclass
class ItemRows:
    """Each database row's truncated diffusion: row i is indices[indptr[i]:indptr[i+1]] (int32
    database rows, strongest first) with values data[...] (float32); n rows."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (nnz,) int32
    data: np.ndarray  # (nnz,) float32

    @property
    def n(self) -> int:
        return len(self.indptr) - 1


def item_row_chunks(solve: Callable[[np.ndarray, np.ndarray], tuple[list, list, object]], n: int, keep: int, *,
                    chunk: int = 2048) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Every item's diffusion from itself, its `keep` strongest entries, a chunk of items at a time.

    solve: a truncated solver's `solve(D, I)` (D, I (nq, 1): seed similarity 1, seed row i ->
    per item (ids, scores) sorted by score); n items. Yields (first item, lengths (c,) int64, rows
    (sum of lengths,) int32, values float32) for items first..first+c-1, in order: a caller can
    write the table out as it comes, never holding it whole."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        ids, sc, _ = solve(np.ones((b - a, 1)), np.arange(a, b, dtype=np.int64)[:, None])
        lengths = np.array([min(keep, len(i)) for i in ids], np.int64)
        cols = np.concatenate([i[:L] for i, L in zip(ids, lengths)]).astype(np.int32)
        vals = np.concatenate([v[:L] for v, L in zip(sc, lengths)]).astype(np.float32)
        yield a, lengths, cols, vals


def item_rows(solve: Callable[[np.ndarray, np.ndarray], tuple[list, list, object]], n: int, keep: int, *, chunk: int = 2048,
              progress: Callable[[int], None] | None = None) -> ItemRows:
    """`item_row_chunks` gathered into one ItemRows in memory (n rows, at most `keep` entries
    each); progress(done) after each chunk."""
    lengths, cols, vals = [np.zeros(1, np.int64)], [], []
    for a, L, c, v in item_row_chunks(solve, n, keep, chunk=chunk):
        lengths.append(L)
        cols.append(c)
        vals.append(v)
        if progress is not None:
            progress(a + len(L))
    return ItemRows(np.cumsum(np.concatenate(lengths)), np.concatenate(cols or [np.zeros(0, np.int32)]),
                    np.concatenate(vals or [np.zeros(0, np.float32)]))


@njit(cache=True, nogil=True)
def _combine(indptr, indices, data, I, Y, k, out_ids, out_sc, out_len, acc, seen, touched):
    """Per query q: the sum of rows I[q, j] weighted Y[q, j] (seeds < 0 or weights <= 0 skipped),
    its top min(k, entries) written to out_ids/out_sc (descending, ties by row) and out_len.
    acc (n,) float64 zeros, seen (n,) bool False, touched (>= kq * longest row,) int64: left reset."""
    for q in range(I.shape[0]):
        t = 0
        for j in range(I.shape[1]):
            s = I[q, j]
            y = Y[q, j]
            if s < 0 or y <= 0.0:
                continue
            for p in range(indptr[s], indptr[s + 1]):
                c = indices[p]
                if not seen[c]:
                    seen[c] = True
                    touched[t] = c
                    t += 1
                acc[c] += y * data[p]
        vals = np.empty(t)
        for i in range(t):
            vals[i] = acc[touched[i]]
        m = min(k, t)
        if m > 0:
            rows = touched[:t].copy()
            if t > 4 * m:  # only the entries at or above the m-th largest are sorted
                thr = np.partition(vals, t - m)[t - m]
                sel = np.flatnonzero(vals >= thr)
                rows, vals = rows[sel], vals[sel]
            by_row = np.argsort(rows)  # ties ordered by row, whatever the rows' order of arrival
            rows, vals = rows[by_row], vals[by_row]
            order = np.argsort(-vals, kind="mergesort")[:m]
            for i in range(m):
                out_ids[q, i] = rows[order[i]]
                out_sc[q, i] = vals[order[i]]
        out_len[q] = m
        for i in range(t):
            c = touched[i]
            acc[c] = 0.0
            seen[c] = False


class RowCombiner:
    """Sums seeds' rows of an ItemRows table and keeps the top k per query, in chunks of queries
    over a kept pool of threads (`retrieval.threads.Workers`), each chunk with its own scratch."""

    def __init__(self, rows: ItemRows, *, threads: int | None = None, chunk: int = 64):
        self.rows = rows
        self.longest = int(np.diff(rows.indptr).max()) if rows.n else 0
        self.workers, self.chunk = Workers(threads), chunk
        self._scratch: queue.SimpleQueue = queue.SimpleQueue()
        self.top(np.zeros((1, 1)), np.full((1, 1), -1, np.int64), 1)  # compiles (or loads) the kernel now

    def _chunk(self, D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            acc, seen, touched = self._scratch.get_nowait()
        except queue.Empty:
            acc, seen, touched = np.zeros(self.rows.n), np.zeros(self.rows.n, np.bool_), np.empty(0, np.int64)
        need = I.shape[1] * self.longest
        if touched.size < need:
            touched = np.empty(need, np.int64)
        nq = I.shape[0]
        ids, sc, ln = np.full((nq, k), -1, np.int64), np.zeros((nq, k)), np.zeros(nq, np.int64)
        try:
            _combine(self.rows.indptr, self.rows.indices, self.rows.data, np.ascontiguousarray(I, np.int64),
                     np.ascontiguousarray(D, np.float64), k, ids, sc, ln, acc, seen, touched)
        finally:
            self._scratch.put((acc, seen, touched))
        return ids, sc, ln

    def top(self, Y: np.ndarray, I: np.ndarray, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Y, I (nq, kq): seed weights and database rows (-1 ignored) -> per query (rows (<= k,)
        int64, scores float64) of the weighted sum of the seeds' rows, best first."""
        parts = self.workers.map_ranges(lambda a, b: self._chunk(Y[a:b], I[a:b], k), I.shape[0], self.chunk)
        ids = [p[0][j, : p[2][j]] for p in parts for j in range(p[0].shape[0])]
        sc = [p[1][j, : p[2][j]] for p in parts for j in range(p[0].shape[0])]
        return ids, sc
