"""Truncated diffusion as one compiled kernel per query: mass selection, principal submatrix, CG.

The same method as `retrieval.truncated` (its scipy code is the reference this is tested against):
for each query, the nodes that the first `hops` terms of x = sum_t (alpha W)^t y reach with the most
mass (`beam` kept per step, `m` in all, the seeds always), then CG on (I - alpha W_S) x = y_S over
that subgraph S. In scipy each step is a sparse-times-sparse product that gathers rows and
allocates; here a query's whole solve runs in compiled code over scratch arrays reused from query
to query (a touched-list resets them, so the cost is the rows visited, never n). The kernel
releases the GIL, so the caller's threads run queries on every core.

numba is the one version-sensitive dependency; it is imported here only.
"""
from __future__ import annotations

import contextlib
import queue

import numpy as np
import scipy.sparse as sp
from numba import njit

from .ids import ids_dtype
from .row_order import RowOrder
from .solve_stats import SolveStats
from .threads import Workers


_SUB = 8  # linear sub-buckets per power of two: the leading 3 bits of the mantissa
_SPAN = 64  # powers of two below the maximum kept apart; smaller values share the lowest bucket


@njit(cache=True, nogil=True)
def _top_threshold(vals: np.ndarray, nv: int, k: int, counts: np.ndarray, buf: np.ndarray) -> float:
    """The k-th largest of vals[:nv] (0 < k < nv; vals > 0): entries >= it are the top k, ties
    included, as scipy's reference keeps them. A histogram over (exponent, leading mantissa bits),
    read straight from the float64 bits, finds the bucket holding the k-th value in one pass; only
    that bucket is partitioned."""
    bits = vals.view(np.int64)
    bmax = bits[0]
    for j in range(1, nv):  # positive doubles order as their bit patterns
        if bits[j] > bmax:
            bmax = bits[j]
    top = (bmax >> 52) & 0x7FF
    nb = _SPAN * _SUB
    for b in range(nb):
        counts[b] = 0
    for j in range(nv):
        counts[_bucket(bits[j], top)] += 1
    above = 0
    b = nb - 1
    while above + counts[b] < k:
        above += counts[b]
        b -= 1
    nbuf = 0
    for j in range(nv):
        if _bucket(bits[j], top) == b:
            buf[nbuf] = vals[j]
            nbuf += 1
    r = k - above  # the r-th largest inside bucket b
    part = np.partition(buf[:nbuf], nbuf - r)
    return part[nbuf - r]


@njit(cache=True, nogil=True)
def _bucket(bits: int, top: int) -> int:
    """Bucket of a positive double from its bits: (biased exponent relative to `top`, the biased
    exponent of the maximum) x _SUB + the leading 3 mantissa bits; monotone in the value."""
    e = ((bits >> 52) & 0x7FF) - top + _SPAN - 1
    if e < 0:
        return 0
    return e * _SUB + ((bits >> 49) & 7)


@njit(cache=True, nogil=True, inline="always")
def _local_id(v, loc, gid, rstart, nl):
    """Node v's local id, handed out (the next one, nl) when it has none; returns (id, ids handed out)."""
    if loc[v] < 0:
        loc[v], gid[nl], rstart[nl] = nl, v, -1
        return nl, nl + 1
    return loc[v], nl


@njit(cache=True, nogil=True)
def _select(indptr, indices, data, seeds, yv, m, alpha, hops, beam, cur_idx, cur_val, nxt_idx, nxt_val, mark,
            acc, acc_idx, slot, loc, gid, rstart, rend, li, lw, stamp, vals, counts, buf):
    """Mass selection for one query: returns (sorted node ids, stamp).

    The walk runs on local ids: a node gets one the first time an edge reaches it (loc (n,) global
    -> local, gid local -> global), and a frontier node's row is copied once, its columns as local
    ids, into li/lw (rstart/rend per local id). The beam revisits the same few hundred rows hop
    after hop, so later hops scatter into a dense vector of a few thousand entries held in cache
    instead of the graph's rows and n-long arrays. Every other array (cur_*, nxt_*, acc, slot,
    mark) is indexed by local id. Every array is left as found (loc, slot -1; acc, nxt_val 0)."""
    nl = 0  # local ids handed out
    ne = 0  # row entries copied
    na = 0
    nc = 0
    for s in range(seeds.size):
        l, nl = _local_id(seeds[s], loc, gid, rstart, nl)
        if slot[l] < 0:
            slot[l] = na
            acc_idx[na] = l
            na += 1
        acc[l] += yv[s]
        if yv[s] != 0.0:
            cur_idx[nc] = l
            cur_val[nc] = yv[s]
            nc += 1
    for _ in range(hops):
        for c in range(nc):
            l = cur_idx[c]
            cv = cur_val[c]
            if rstart[l] < 0:  # first visit: copy the row, its columns as local ids
                u = gid[l]
                a, b = indptr[u], indptr[u + 1]
                if ne + (b - a) > li.size:
                    li2, lw2 = np.empty(2 * (ne + b - a), li.dtype), np.empty(2 * (ne + b - a), lw.dtype)
                    li2[:ne], lw2[:ne] = li[:ne], lw[:ne]
                    li, lw = li2, lw2
                rstart[l] = ne
                for e in range(a, b):
                    li[ne], nl = _local_id(indices[e], loc, gid, rstart, nl)
                    lw[ne] = data[e]
                    ne += 1
                rend[l] = ne
            for e in range(rstart[l], rend[l]):
                nxt_val[li[e]] += cv * lw[e]
        # masses are positive, so the step's non-zeros are the nodes it reached (scipy drops the
        # exact zeros too); listed by local id, a scan of a few thousand entries
        nn = 0
        for v in range(nl):
            if nxt_val[v] != 0.0:
                nxt_idx[nn] = v
                nn += 1
        if nn == 0:
            break
        for j in range(nn):  # scale by alpha; leave nxt_val zero again
            v = nxt_idx[j]
            vals[j] = nxt_val[v] * alpha
            nxt_val[v] = 0.0
        thr = _top_threshold(vals, nn, beam, counts, buf) if nn > beam else -np.inf
        nc = 0
        for j in range(nn):
            if vals[j] >= thr:
                v = nxt_idx[j]
                cur_idx[nc] = v
                cur_val[nc] = vals[j]
                nc += 1
                if slot[v] < 0:
                    slot[v] = na
                    acc_idx[na] = v
                    na += 1
                acc[v] += vals[j]
    # the seeds always (scipy adds 1e30 to them), then the heaviest others up to m in all
    stamp += 1
    nseed = 0
    for s in range(seeds.size):
        l = loc[seeds[s]]
        if mark[l] != stamp:
            mark[l] = stamp
            nseed += 1
    no = 0
    for j in range(na):
        if mark[acc_idx[j]] != stamp:
            vals[no] = acc[acc_idx[j]]
            no += 1
    k = m - nseed
    if k <= 0:
        thr = np.inf
    elif no > k:
        thr = _top_threshold(vals, no, k, counts, buf)
    else:
        thr = -np.inf
    nodes = np.empty(na, np.int64)
    cnt = 0
    for j in range(na):
        v = acc_idx[j]
        if mark[v] == stamp or acc[v] >= thr:
            nodes[cnt] = gid[v]
            cnt += 1
        acc[v] = 0.0
        slot[v] = -1
    for l in range(nl):
        loc[gid[l]] = -1
    return np.sort(nodes[:cnt]), stamp


@njit(cache=True, nogil=True)
def _subgraph(indptr, indices, data, nodes, pos, alpha, li, lx):
    """-alpha W[nodes][:, nodes] as CSR (lp, li, lx) over positions in `nodes`, with pos (n,), -1
    off the nodes, set to each node's position (the caller resets it). li (int32), lx (float64):
    scratch used when it holds every edge of the rows (a fresh allocation per query would cost
    page faults at this size)."""
    s = nodes.size
    for j in range(s):
        pos[nodes[j]] = j
    bound = 0  # the rows' edges: room for the subgraph's, filled in one pass
    for j in range(s):
        bound += indptr[nodes[j] + 1] - indptr[nodes[j]]
    if bound > li.size:
        li = np.empty(bound, np.int32)
        lx = np.empty(bound)
    lp = np.zeros(s + 1, np.int64)
    nnz = 0
    for j in range(s):
        u = nodes[j]
        for e in range(indptr[u], indptr[u + 1]):
            p = pos[indices[e]]
            if p >= 0:
                li[nnz] = p
                lx[nnz] = -alpha * data[e]
                nnz += 1
        lp[j + 1] = nnz
    return lp, li, lx


@njit(cache=True, nogil=True)
def _solve_local(indptr, indices, data, nodes, pos, seeds, yv, alpha, rtol, maxiter, li, lx):
    """CG on (I - alpha W[nodes][:, nodes]) x = y. Returns x (s,), iterations, relative residual.
    li, lx: `_subgraph`'s scratch."""
    s = nodes.size
    lp, li, lx = _subgraph(indptr, indices, data, nodes, pos, alpha, li, lx)
    b = np.zeros(s)
    for t in range(seeds.size):
        p = pos[seeds[t]]
        if p >= 0:
            b[p] += yv[t]  # a repeated seed adds up, as in query_vectors
    for j in range(s):
        pos[nodes[j]] = -1
    x = np.zeros(s)
    r = b.copy()
    pvec = b.copy()
    q = np.empty(s)
    rr = 0.0
    for j in range(s):
        rr += r[j] * r[j]
    bnorm = np.sqrt(rr)
    tol = rtol * (bnorm if bnorm > 0 else 1.0)
    it = 0
    while it < maxiter and np.sqrt(rr) > tol:
        pq = 0.0
        for j in range(s):  # q = (I - alpha W_S) p
            acc = pvec[j]
            for e in range(lp[j], lp[j + 1]):
                acc += lx[e] * pvec[li[e]]
            q[j] = acc
            pq += pvec[j] * acc
        a = rr / pq if pq != 0 else rr
        rr_new = 0.0
        for j in range(s):
            x[j] += a * pvec[j]
            r[j] -= a * q[j]
            rr_new += r[j] * r[j]
        beta = rr_new / rr if rr != 0 else 0.0
        for j in range(s):
            pvec[j] = r[j] + beta * pvec[j]
        rr = rr_new
        it += 1
    res = 0.0  # the true residual, as block_cg reports it
    for j in range(s):
        acc = x[j]
        for e in range(lp[j], lp[j + 1]):
            acc += lx[e] * x[li[e]]
        res += (b[j] - acc) ** 2
    return x, it, np.sqrt(res) / (bnorm if bnorm > 0 else 1.0)


@njit(cache=True, nogil=True)
def _chunk(indptr, indices, data, sindptr, sindices, sdata, seed_ids, seed_w, m, alpha, hops, beam, rtol, maxiter, keep,
           out_ids, out_sc, out_len, out_it, out_res, scratch_i, scratch_f, scratch_o, mark, counts, stamp_box, edge_i, edge_x,
           local_i, local_w):
    """Queries seed_ids/seed_w (nq, kq) one after another over reused scratch: scratch_i (6, n)
    int32 (int64 past 2^31 nodes: cur_idx, nxt_idx, acc_idx, slot = -1, pos = -1, gid), scratch_f (5, n)
    float64 (cur_val, nxt_val = 0, acc = 0, vals, buf), scratch_o (2, n) row offsets (rstart, rend),
    mark (n,) int64 stamps (stamp_box[0] the last used), edge_i/edge_x the subgraph's edges,
    local_i/local_w the selection's copied rows. Every array is left as found (slot/pos -1, nxt_val
    and acc 0), so the next call needs no O(n) reset. pos doubles as the selection's global ->
    local map (both leave it -1)."""
    cur_idx, nxt_idx, acc_idx, slot, pos, gid = (scratch_i[0], scratch_i[1], scratch_i[2], scratch_i[3], scratch_i[4],
                                                 scratch_i[5])
    cur_val, nxt_val, acc, vals, buf = scratch_f[0], scratch_f[1], scratch_f[2], scratch_f[3], scratch_f[4]
    stamp = stamp_box[0]
    for q in range(seed_ids.shape[0]):
        used = seed_ids[q] >= 0
        seeds, yv = seed_ids[q][used].astype(np.int64), seed_w[q][used].astype(np.float64)
        nodes, stamp = _select(sindptr, sindices, sdata, seeds, yv, m, alpha, hops, beam, cur_idx, cur_val, nxt_idx, nxt_val,
                               mark, acc, acc_idx, slot, pos, gid, scratch_o[0], scratch_o[1], local_i, local_w, stamp, vals,
                               counts, buf)
        x, it, res = _solve_local(indptr, indices, data, nodes, pos, seeds, yv, alpha, rtol, maxiter, edge_i, edge_x)
        order = np.argsort(-x, kind="mergesort")
        L = min(keep, order.size)
        for j in range(L):
            out_ids[q, j] = nodes[order[j]]
            out_sc[q, j] = x[order[j]]
        out_len[q] = L
        out_it[q] = it
        out_res[q] = res
    stamp_box[0] = stamp


class CompiledTruncatedSolver:
    """Mass-selected truncated diffusion over one graph, built once: W (float32 values, 32-bit
    column ids) in reverse Cuthill-McKee order, the selection's graph, a thread pool and per-thread
    scratch reused from call to call (so one query costs the rows it visits, never n).
    `solve(D, I)` has `retrieval.truncated.TruncatedSolver.solve`'s contract (select = "mass").

    select_edges > 0 walks only each node's `select_edges` strongest edges during the selection
    (the CG still runs on every edge of the chosen subgraph): fewer rows' worth of edges per step,
    and on crossing manifolds the mass stays on the query's own (BENCHMARKS.md measures both)."""

    def __init__(self, W: sp.spmatrix, *, m: int = 1000, alpha: float = 0.99, gamma: float = 3.0, rtol: float = 1e-6,
                 maxiter: int = 100, hops: int = 8, beam: int | None = None, select_edges: int = 0, reorder: bool = True,
                 threads: int | None = None, chunk: int = 32):
        W = sp.csr_matrix(W, dtype=np.float32)
        W.sum_duplicates()
        self.n = W.shape[0]
        # reverse Cuthill-McKee puts a manifold's nodes next to each other, so the rows a query
        # visits share cache lines (ids are mapped into this order and back)
        self.perm = self.inv = None
        if reorder:
            rows = RowOrder(W, dtype=np.float32, threads=1)
            self.perm, W = rows.perm, rows.Ap
            self.inv = np.empty_like(self.perm)
            self.inv[self.perm] = np.arange(self.n)
        self.graph = (W.indptr.astype(np.int64), W.indices.astype(np.int32), W.data)
        self.sel = self.graph
        if select_edges > 0:
            from .truncated import strongest_edges

            Ws = strongest_edges(W, select_edges)
            self.sel = (Ws.indptr.astype(np.int64), Ws.indices.astype(np.int32), Ws.data)
        self.m, self.alpha, self.gamma, self.rtol, self.maxiter = min(m, self.n), alpha, gamma, rtol, maxiter
        self.hops, self.beam = hops, min(beam or self.m, self.n)
        # edges of the heaviest m + 64 rows: room for any subgraph's edges (more seeds than 64 allocate)
        deg = np.diff(self.graph[0])
        self.edge_room = int(np.sort(deg)[-min(self.n, self.m + 64):].sum()) if self.n else 0
        self.workers, self.chunk = Workers(threads), chunk
        self._scratch: queue.SimpleQueue = queue.SimpleQueue()
        self.solve_chunk(np.zeros((1, 1)), np.full((1, 1), -1, np.int64))  # loads the compiled code now, not on a first query

    @contextlib.contextmanager
    def scratch(self):
        """One thread's scratch for the kernels (`_chunk`'s scratch arguments, in order), taken from
        the kept ones or made, and put back after use (the kernels reset it after every query)."""
        try:
            scratch = self._scratch.get_nowait()
        except queue.Empty:
            n = self.n
            si = np.empty((6, n), ids_dtype(n))  # node ids and positions: half the cache footprint
            si[3:5] = -1
            sf = np.empty((5, n))
            sf[1:3] = 0.0
            sel_nnz = len(self.sel[1])
            # the selection's copied rows: a query copies each row its beam visits once (room for
            # 4x the heaviest subgraph's edges; the kernel grows it for a query that needs more)
            room = min(4 * self.edge_room, sel_nnz) + 1
            scratch = (si, sf, np.empty((2, n), ids_dtype(sel_nnz + 1)), np.zeros(n, np.int64), np.empty(_SPAN * _SUB, np.int64),
                       np.zeros(1, np.int64), np.empty(self.edge_room, np.int32), np.empty(self.edge_room),
                       np.empty(room, ids_dtype(n)), np.empty(room, self.sel[2].dtype))
        try:
            yield scratch
        finally:
            self._scratch.put(scratch)

    def solve_chunk(self, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, SolveStats]:
        """One chunk of queries in the calling thread (the GIL released). D, I (nq, kq) seeds.
        Returns ids (nq, keep) int64 database rows (-1 padded), scores (nq, keep) float64 sorted
        descending, lengths (nq,) int64 and the CG stats; keep = m + kq (the seeds stay even past
        m; a tie at the m-th weight beyond that is cut)."""
        nq = I.shape[0]
        keep = self.m + I.shape[1]
        ids = np.full((nq, keep), -1, np.int64)
        sc = np.zeros((nq, keep))
        ln, it, res = np.zeros(nq, np.int64), np.zeros(nq, np.int64), np.zeros(nq)
        Y = np.maximum(np.asarray(D, np.float64), 0.0) ** self.gamma
        I = np.asarray(I, np.int64)
        if self.perm is not None:
            I = np.where(I >= 0, self.inv[np.maximum(I, 0)], -1)
        with self.scratch() as scratch:
            _chunk(*self.graph, *self.sel, np.ascontiguousarray(I), np.ascontiguousarray(Y), self.m, self.alpha, self.hops,
                   self.beam, self.rtol, self.maxiter, keep, ids, sc, ln, it, res, *scratch)
        return self.database_ids(ids), sc, ln, SolveStats(it, res, res <= self.rtol * 1.01 + 1e-12)

    def database_ids(self, ids: np.ndarray) -> np.ndarray:
        """Node ids of the solver's row order (any shape, int64, -1 padding kept) -> database rows."""
        return ids if self.perm is None else np.where(ids >= 0, self.perm[np.maximum(ids, 0)], -1)

    def solve(self, D: np.ndarray, I: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], SolveStats]:
        """D, I (nq, kq): each query's database neighbours (similarities, ids; -1 ignored).
        Returns: per query (ids (<= m,), scores) sorted by score, and the solver stats."""
        parts = self.workers.map_ranges(lambda a, b: self.solve_chunk(D[a:b], I[a:b]), I.shape[0], self.chunk)
        ids = [p[0][j, : p[2][j]] for p in parts for j in range(p[0].shape[0])]
        sc = [p[1][j, : p[2][j]] for p in parts for j in range(p[0].shape[0])]
        st = SolveStats(*(np.concatenate([getattr(p[3], f) for p in parts]) if parts else np.zeros(0)
                          for f in ("iterations", "residuals", "converged")))
        return ids, sc, st
