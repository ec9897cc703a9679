"""Database-side truncated diffusion (the offline step of Iscen et al., CVPR 2017): every database
item's diffusion from itself, computed once and kept as a sparse row of its `keep` strongest
entries; a new query is then a kNN search for its kq seeds and a weighted sum of their rows.

Diffusion is linear: the solution of (I - alpha W) x = sum_j y_j e_j is sum_j y_j x_j, where x_j
solves (I - alpha W) x_j = e_j. Summing the seeds' rows, weighted by y_j = s_j^gamma, therefore
ranks as the query's own diffusion would, up to each row's truncation (its subgraph of m nodes
chosen by mass, `retrieval.truncated_compiled`, and the `keep` entries kept). The online cost no
longer depends on the graph: kq rows of `keep` entries are gathered and the top k of their sum
sorted, in compiled code.

Neighbouring items share most of their subgraphs, so a few items that follow each other in the
graph's RCM order are solved together: one mass selection seeded by all of them, and each item's
CG on that subgraph, their columns in one pass over it per iteration (BENCHMARKS.md: groups of 4
halve the offline step and rank slightly better, each item's mass being more inside).

Rows are float32 values and int32 columns, `keep` per item at most: n * keep * 8 bytes
(10^5 items, keep 700: 530 MB). They can be produced a chunk at a time (`item_row_chunks`) and
ranked from memory-mapped files (any arrays will do), so neither the offline step nor a process
that ranks needs the table in its own memory.
"""
from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from numba import njit

from .threads import Workers
from .truncated_compiled import CompiledTruncatedSolver, _select, _subgraph

log = logging.getLogger(__name__)


@dataclass
class ItemRows:
    """Each database item's truncated diffusion, stored in the order the rows were solved: item i's
    row is storage row r = slot[i], indices[indptr[r]:indptr[r+1]] (int32 database rows, strongest
    first) with values data[...] (float32); n items."""

    indptr: np.ndarray  # (n + 1,) int64, over storage rows
    indices: np.ndarray  # (nnz,) int32
    data: np.ndarray  # (nnz,) float32
    slot: np.ndarray | None = None  # (n,) int64 item -> storage row; None: item i is row i

    def __post_init__(self):
        if self.slot is None:
            self.slot = np.arange(len(self.indptr) - 1, dtype=np.int64)

    @property
    def n(self) -> int:
        return len(self.slot)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item i's (database rows, values), strongest first."""
        r = self.slot[i]
        return self.indices[self.indptr[r] : self.indptr[r + 1]], self.data[self.indptr[r] : self.indptr[r + 1]]


@njit(cache=True, nogil=True)
def _columns_cg(lp, li, lx, s, at, rtol, maxiter):
    """CG for (I + L) x_t = e_{at[t]}, t < G, L the CSR (lp, li, lx) (s, s): each column on its own
    recurrence (its own step sizes, stopped once its residual is below rtol, as `_solve_local` would
    stop it), one pass over L per iteration for all of them. Returns X (s, G) and, per column,
    whether it converged (G,) bool."""
    G = at.size
    X, R, P, Q = np.zeros((s, G)), np.zeros((s, G)), np.zeros((s, G)), np.empty((s, G))
    rr = np.ones(G)
    live = np.ones(G, np.bool_)
    acc, pq, a, rn = np.empty(G), np.empty(G), np.empty(G), np.empty(G)
    for t in range(G):
        R[at[t], t] = 1.0
        P[at[t], t] = 1.0
    for _ in range(maxiter):
        running = 0
        for t in range(G):
            live[t] = live[t] and np.sqrt(rr[t]) > rtol  # ||b|| = 1
            running += live[t]
        if running == 0:
            break
        pq[:] = 0.0
        for j in range(s):  # Q = (I + L) P, all columns in one pass over the rows
            if G == 1:  # one column: its sum in a register (the loop below stores it per edge)
                q = P[j, 0]
                for e in range(lp[j], lp[j + 1]):
                    q += lx[e] * P[li[e], 0]
                Q[j, 0] = q
                pq[0] += P[j, 0] * q
                continue
            for t in range(G):
                acc[t] = P[j, t]
            for e in range(lp[j], lp[j + 1]):
                c, w = li[e], lx[e]
                for t in range(G):
                    acc[t] += w * P[c, t]
            for t in range(G):
                Q[j, t] = acc[t]
                pq[t] += P[j, t] * acc[t]
        for t in range(G):
            a[t] = (rr[t] / pq[t] if pq[t] != 0 else rr[t]) if live[t] else 0.0
            rn[t] = 0.0
        for j in range(s):
            for t in range(G):
                X[j, t] += a[t] * P[j, t]
                R[j, t] -= a[t] * Q[j, t]
                rn[t] += R[j, t] * R[j, t]
        for t in range(G):
            if live[t]:
                beta = rn[t] / rr[t] if rr[t] != 0 else 0.0
                for j in range(s):
                    P[j, t] = R[j, t] + beta * P[j, t]
                rr[t] = rn[t]
    return X, np.sqrt(rr) <= rtol


@njit(cache=True, nogil=True)
def _group_rows(indptr, indices, data, sindptr, sindices, sdata, first, stop, group, m, alpha, hops, beam, rtol, maxiter,
                out_ids, out_sc, out_len, out_ok, scratch_i, scratch_f, scratch_o, mark, counts, stamp_box, edge_i, edge_x,
                local_i, local_w):
    """The rows of the graph's nodes first..stop-1, `group` consecutive nodes at a time: one mass
    selection seeded by the group's nodes (weight 1 each), then each node's CG on that subgraph
    (`_columns_cg`). Row r of out_* is node first + r: its subgraph's nodes by score (out_ids,
    out_sc, the first out_len[r]; a tie at the width of out_ids is cut) and whether its CG converged.
    Scratch as `retrieval.truncated_compiled._chunk`'s, left reset."""
    cur_idx, nxt_idx, acc_idx, slot, pos, gid = (scratch_i[0], scratch_i[1], scratch_i[2], scratch_i[3], scratch_i[4],
                                                 scratch_i[5])
    cur_val, nxt_val, acc, vals, buf = scratch_f[0], scratch_f[1], scratch_f[2], scratch_f[3], scratch_f[4]
    stamp = stamp_box[0]
    width = out_ids.shape[1]
    for g0 in range(first, stop, group):
        items = np.arange(g0, min(g0 + group, stop))
        nodes, stamp = _select(sindptr, sindices, sdata, items, np.ones(items.size), m, alpha, hops, beam, cur_idx, cur_val,
                               nxt_idx, nxt_val, mark, acc, acc_idx, slot, pos, gid, scratch_o[0], scratch_o[1], local_i, local_w,
                               stamp, vals, counts, buf)
        lp, li, lx = _subgraph(indptr, indices, data, nodes, pos, alpha, edge_i, edge_x)
        at = np.empty(items.size, np.int64)
        for t in range(items.size):
            at[t] = pos[items[t]]  # the seeds are always selected
        for j in range(nodes.size):
            pos[nodes[j]] = -1
        X, ok = _columns_cg(lp, li, lx, nodes.size, at, rtol, maxiter)
        L = min(width, nodes.size)
        for t in range(items.size):
            r = g0 - first + t
            order = np.argsort(-X[:, t], kind="mergesort")
            for j in range(L):
                out_ids[r, j] = nodes[order[j]]
                out_sc[r, j] = X[order[j], t]
            out_len[r] = L
            out_ok[r] = ok[t]
    stamp_box[0] = stamp


def _rows_range(solver: CompiledTruncatedSolver, a: int, b: int, keep: int, group: int):
    """Rows of the solver's nodes a..b-1 (its row order) in the calling thread: (items (c,) int64
    database rows, ids (c, w) int64, scores (c, w) float64, lengths (c,) int64, converged (c,))."""
    c, width = b - a, min(keep, solver.m + group)
    ids, sc = np.full((c, width), -1, np.int64), np.zeros((c, width))
    ln, ok = np.zeros(c, np.int64), np.zeros(c, np.bool_)
    with solver.scratch() as scratch:
        _group_rows(*solver.graph, *solver.sel, a, b, group, solver.m, solver.alpha, solver.hops, solver.beam, solver.rtol,
                    solver.maxiter, ids, sc, ln, ok, *scratch)
    return solver.database_ids(np.arange(a, b, dtype=np.int64)), solver.database_ids(ids), sc, ln, ok


def item_row_chunks(solver: CompiledTruncatedSolver, keep: int, *, group: int = 4, chunk: int = 2048
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Every item's diffusion from itself, its `keep` strongest entries, a chunk of items at a time
    in the solver's row order (reverse Cuthill-McKee when it reorders: neighbours follow each
    other). `group` consecutive items share one mass selection seeded by all of them (the
    solver's m / hops / beam; a wider beam than one item's covers the group), and each item's CG
    runs on that subgraph; group = 1 is each item's own truncated solve. The chunk is split over
    the solver's threads. Yields (items (c,) int64, lengths (c,) int64, rows (sum of lengths,)
    int32, values float32): a caller can write the table out as it comes, never holding it whole.
    Rows whose CG stopped at the solver's maxiter before rtol are counted in a warning at the end."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    n, threads = solver.n, solver.workers.threads
    chunk = group * max(1, -(-chunk // group))
    unconverged = 0
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        part = group * max(1, -(-(b - a) // (threads * group)))  # one group-aligned range per thread
        starts = list(range(a, b, part))
        parts = solver.workers.map(lambda s0, s1: _rows_range(solver, s0, s1, keep, group), starts,
                                   [min(s0 + part, b) for s0 in starts])
        items = np.concatenate([p[0] for p in parts])
        lengths = np.concatenate([p[3] for p in parts])
        used = [np.arange(p[1].shape[1]) < p[3][:, None] for p in parts]  # the padded rows' first lengths entries
        cols = np.concatenate([p[1][u] for p, u in zip(parts, used)]).astype(np.int32)
        vals = np.concatenate([p[2][u] for p, u in zip(parts, used)]).astype(np.float32)
        unconverged += sum(int((~p[4]).sum()) for p in parts)
        yield items, lengths, cols, vals
    if unconverged:
        log.warning("precomputed: %d of %d rows stopped at maxiter = %d before rtol = %g (kept as they are)", unconverged, n,
                    solver.maxiter, solver.rtol)


def item_rows(solver: CompiledTruncatedSolver, keep: int, *, group: int = 4, chunk: int = 2048,
              progress: Callable[[int], None] | None = None) -> ItemRows:
    """`item_row_chunks` gathered into one ItemRows in memory (n items, at most `keep` entries
    each); progress(done) after each chunk."""
    slot = np.empty(solver.n, np.int64)
    lengths, cols, vals, done = [np.zeros(1, np.int64)], [], [], 0
    for items, L, c, v in item_row_chunks(solver, keep, group=group, chunk=chunk):
        slot[items] = np.arange(done, done + len(items))
        done += len(items)
        lengths.append(L)
        cols.append(c)
        vals.append(v)
        if progress is not None:
            progress(done)
    return ItemRows(np.cumsum(np.concatenate(lengths)), np.concatenate(cols or [np.zeros(0, np.int32)]),
                    np.concatenate(vals or [np.zeros(0, np.float32)]), slot)


@njit(cache=True, nogil=True)
def _combine(indptr, indices, data, slot, I, Y, k, out_ids, out_sc, out_len, acc, seen, touched):
    """Per query q: the sum of items I[q, j]'s rows (storage row slot[item]) weighted Y[q, j]
    (seeds < 0 or weights <= 0 skipped), its top min(k, entries) written to out_ids/out_sc
    (descending, ties by row) and out_len.
    acc (n,) float64 zeros, seen (n,) bool False, touched (>= kq * longest row,) int64: left reset."""
    for q in range(I.shape[0]):
        t = 0
        for j in range(I.shape[1]):
            s = I[q, j]
            y = Y[q, j]
            if s < 0 or y <= 0.0:
                continue
            r = slot[s]
            for p in range(indptr[r], indptr[r + 1]):
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
            _combine(self.rows.indptr, self.rows.indices, self.rows.data, self.rows.slot, np.ascontiguousarray(I, np.int64),
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
