"""Truncated diffusion: each query solved on a subgraph of m nodes around it (Iscen et al. 2017).

For query q the system is the principal submatrix of (I - alpha W) (still SPD) on the m nodes of
its neighbourhood, so the online cost does not grow with n. Neighbourhoods are chosen along the
graph: breadth first from the query's top-kq database neighbours (`graph_neighbourhood`), or the
nodes that the first hops of the diffusion series reach with the most mass (`mass_neighbourhoods`).
"""
from __future__ import annotations

import queue

import numpy as np
import scipy.sparse as sp

from .diffusion import SolveStats, block_cg, diffusion_operator, query_vectors_sparse
from .threads import Workers

SELECTIONS = ("mass", "bfs")


def graph_neighbourhood(W: sp.csr_matrix, seeds: np.ndarray, m: int) -> np.ndarray:
    """Up to m nodes around `seeds`, breadth first over the graph's edges (the manifold), not by
    Euclidean distance: seeds first, then hop-1 nodes, ..., the last hop cut by edge weight.

    Returns: (<= m,) int64 node ids.
    """
    seeds = np.unique(np.asarray(seeds, dtype=np.int64))
    seeds = seeds[seeds >= 0]
    visited = np.zeros(W.shape[0], dtype=bool)
    visited[seeds] = True
    order = [seeds]
    count = seeds.size
    frontier = seeds
    while count < m and frontier.size:
        sub = W[frontier]
        cand, pos = np.unique(sub.indices, return_index=True)
        keep = ~visited[cand]
        cand, weight = cand[keep], sub.data[pos][keep]
        if cand.size == 0:
            break
        if count + cand.size > m:
            cand = cand[np.argsort(-weight, kind="stable")[: m - count]]
        visited[cand] = True
        order.append(cand)
        count += cand.size
        frontier = cand
    return np.concatenate(order)[:m]


def _keep_top_per_row(A: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The k largest entries of every row of A (CSR; ties at the k-th value are kept too)."""
    counts = np.diff(A.indptr)
    if counts.max(initial=0) <= k:
        return A
    keep = np.ones(A.data.size, dtype=bool)
    for j in np.flatnonzero(counts > k):  # one partition per long row: O(nnz) in all
        a, b = A.indptr[j], A.indptr[j + 1]
        seg = A.data[a:b]
        keep[a:b] = seg >= np.partition(seg, seg.size - k)[seg.size - k]
    row = np.repeat(np.arange(A.shape[0]), counts)[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=A.shape[0]))])
    return sp.csr_matrix((A.data[keep], A.indices[keep], indptr), shape=A.shape)


def strongest_edges(W: sp.csr_matrix, t: int) -> sp.csr_matrix:
    """W with only each row's t largest weights (ties at the t-th kept), sorted indices: the graph
    that mass selection walks when it is told to follow strong edges only (not symmetric)."""
    Ws = _keep_top_per_row(sp.csr_matrix(W), t)
    Ws.sort_indices()
    return Ws


def mass_neighbourhoods(W: sp.csr_matrix, D: np.ndarray, I: np.ndarray, m: int, *, alpha: float = 0.99, gamma: float = 3.0,
                        hops: int = 8, beam: int | None = None, batch: int = 128) -> list[np.ndarray]:
    """Per query, up to m nodes carrying the most diffusion mass: the first `hops` terms of the
    series x = sum_t (alpha W)^t y, computed as sparse products for a batch of queries at once, each
    step keeping the `beam` heaviest nodes per query (m by default). Unlike breadth-first search,
    nodes are chosen by the mass reaching them along every path, not by hop count and one edge.
    Queries are rows (Y W, W symmetric), so a step costs the rows of W the queries reach, not N.

    Args: W (n, n) symmetric CSR; D, I (nq, kq) similarities and ids of each query's database
    neighbours (y = max(D, 0)^gamma there; -1 ids ignored). Returns: per query (<= m,) int64 node
    ids, the query's own neighbours always included.
    """
    n, nq = W.shape[0], I.shape[0]
    beam = beam or m
    dt = np.result_type(W.dtype, np.float32)
    out: list[np.ndarray] = []
    for b0 in range(0, nq, batch):
        Ib, Db = I[b0 : b0 + batch], D[b0 : b0 + batch]
        # queries as rows, in W's (floating) dtype: a product of mixed dtypes copies all of W every step
        Y = sp.csr_matrix(query_vectors_sparse(Db, Ib, n, gamma=gamma).T, dtype=dt)
        cur, acc = Y, Y.copy()
        for _ in range(hops):
            cur = _keep_top_per_row(sp.csr_matrix(cur @ W) * dt.type(alpha), beam)
            acc = acc + cur
        seeds = sp.csr_matrix(query_vectors_sparse(np.ones_like(Db), Ib, n).T, dtype=dt)
        acc = _keep_top_per_row(sp.csr_matrix(acc + seeds * 1e30), m)  # the seeds always stay
        out += [acc.indices[acc.indptr[j] : acc.indptr[j + 1]].astype(np.int64) for j in range(acc.shape[0])]
    return out


def principal_submatrix(W: sp.csr_matrix, nodes: np.ndarray, pos: np.ndarray) -> sp.csr_matrix:
    """W[nodes][:, nodes] as (m, m) CSR, for distinct `nodes` (m,). `pos` (n,) int64 maps each of
    them to its position and every other node to -1 (so the cost is the rows' non-zeros, not n)."""
    rows = W[nodes]
    cols = pos[rows.indices]
    keep = cols >= 0
    row_of = np.repeat(np.arange(nodes.size), np.diff(rows.indptr))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of[keep], minlength=nodes.size))])
    return sp.csr_matrix((rows.data[keep], cols[keep], indptr), shape=(nodes.size, nodes.size))


class TruncatedSolver:
    """Truncated diffusion over one graph, built once: the graph in CSR, a thread pool and reusable
    (n,) position maps (node id -> position in the current subgraph, -1 off it: cutting a principal
    submatrix then costs its rows' non-zeros, not n; one map per solve running at once, kept for
    the next); `solve(D, I)` answers a batch of queries (chunks of 128 in `threads` threads)."""

    def __init__(self, W: sp.spmatrix, *, m: int = 1000, alpha: float = 0.99, gamma: float = 3.0, rtol: float = 1e-6,
                 maxiter: int = 100, select: str = "bfs", hops: int = 8, beam: int | None = None, select_edges: int = 0,
                 threads: int | None = None):
        if select not in SELECTIONS:
            raise ValueError(f"truncated diffusion: select must be one of {SELECTIONS}, got {select!r}")
        self.W = sp.csr_matrix(W)
        # "mass" walks each node's select_edges strongest edges only (0: all); CG uses every edge
        self.Wsel = strongest_edges(self.W, select_edges) if select_edges > 0 else self.W
        self.m, self.alpha, self.gamma, self.rtol, self.maxiter = min(m, self.W.shape[0]), alpha, gamma, rtol, maxiter
        self.select, self.hops, self.beam = select, hops, beam
        self.workers = Workers(threads)
        self._free_positions: queue.SimpleQueue = queue.SimpleQueue()

    def neighbourhoods(self, D: np.ndarray, I: np.ndarray) -> list[np.ndarray]:
        """Per query, its subgraph's node ids (the query's own neighbours included)."""
        if self.select == "mass":
            return mass_neighbourhoods(self.Wsel, D, I, self.m, alpha=self.alpha, gamma=self.gamma, hops=self.hops, beam=self.beam)
        return [graph_neighbourhood(self.W, I[q], self.m) for q in range(I.shape[0])]

    def _solve_one(self, d: np.ndarray, i: np.ndarray, nodes: np.ndarray):
        try:
            pos = self._free_positions.get_nowait()
        except queue.Empty:
            pos = np.full(self.W.shape[0], -1, np.int64)
        pos[nodes] = np.arange(nodes.size)
        try:
            Ws = principal_submatrix(self.W, nodes, pos)
            seeded = i >= 0
            local = pos[i[seeded]]
        finally:
            pos[nodes] = -1
            self._free_positions.put(pos)
        y = np.zeros(nodes.size)
        ok = local >= 0
        np.add.at(y, local[ok], np.maximum(np.asarray(d, np.float64)[seeded][ok], 0.0) ** self.gamma)  # a repeated seed adds up, as in query_vectors
        x, st = block_cg(diffusion_operator(Ws, self.alpha), y, rtol=self.rtol, maxiter=self.maxiter)
        order = np.argsort(-x, kind="stable")
        return nodes[order], x[order], st

    def solve(self, D: np.ndarray, I: np.ndarray, *, neighbourhoods: list[np.ndarray] | None = None
              ) -> tuple[list[np.ndarray], list[np.ndarray], SolveStats]:
        """D, I (nq, kq): each query's database neighbours (similarities, ids; -1 ignored), which
        seed y = max(D, 0)^gamma. `neighbourhoods[q]` (optional) replaces the selection.
        Returns: per query (ids (<= m,), scores) sorted by score, and the solver stats."""
        nq = I.shape[0]

        def chunk(bounds: tuple[int, int]) -> list:
            a, b = bounds
            if neighbourhoods is not None:
                nbs = [np.asarray(neighbourhoods[q], np.int64) for q in range(a, b)]
                nbs = [np.unique(v[v >= 0]) for v in nbs]
            else:
                nbs = self.neighbourhoods(D[a:b], I[a:b])
            return [self._solve_one(D[q], I[q], nodes) for q, nodes in zip(range(a, b), nbs)]

        # chunks of queries in threads: the sparse kernels release the GIL for part of their work
        bounds = [(a, min(a + 128, nq)) for a in range(0, nq, 128)]
        done = self.workers.map(chunk, bounds)
        flat = [r for part in done for r in part]
        stats = SolveStats(np.array([r[2].iterations[0] for r in flat], np.int64).reshape(nq),
                           np.array([r[2].residuals[0] for r in flat], np.float64).reshape(nq),
                           np.array([r[2].converged[0] for r in flat], bool).reshape(nq))
        return [r[0] for r in flat], [r[1] for r in flat], stats


def truncated_diffusion(W: sp.csr_matrix, D: np.ndarray, I: np.ndarray, *, m: int = 1000,
                        neighbourhoods: list[np.ndarray] | None = None, **params) -> tuple[list[np.ndarray], list[np.ndarray], SolveStats]:
    """One-off `TruncatedSolver(W, m=m, **params).solve(D, I, neighbourhoods=...)` (see there)."""
    return TruncatedSolver(W, m=m, **params).solve(D, I, neighbourhoods=neighbourhoods)
