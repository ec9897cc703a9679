"""Diffusion ranking: solve (I - alpha W) x = y by conjugate gradient (Iscen et al., CVPR 2017).

Many queries are many right-hand sides: `block_cg` runs independent CG recurrences for all columns
in lockstep, so each iteration is one sparse-matrix times dense-block product, and each column
stops on its own tolerance. `scipy_cg` is the one wrapper around scipy's version-sensitive `cg`.
"""
from __future__ import annotations

import inspect
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveStats:
    """Per right-hand side: iterations run, final relative residual ||b - Ax|| / ||b||, converged."""

    iterations: np.ndarray  # (m,) int64
    residuals: np.ndarray  # (m,) float64
    converged: np.ndarray  # (m,) bool


def query_vectors(D: np.ndarray, I: np.ndarray, n: int, *, gamma: float = 3.0) -> np.ndarray:
    """Initial vectors y for diffusion from each query's top-kq database neighbours.

    Args:
        D: (nq, kq) similarities, I: (nq, kq) int64 database indices, n: database size.
    Returns: (n, nq) float64 with y[I[q], q] = max(D[q], 0)^gamma, zero elsewhere.
    """
    nq, kq = I.shape
    Y = np.zeros((n, nq), dtype=np.float64)
    cols = np.repeat(np.arange(nq), kq)
    Y[I.ravel(), cols] = np.maximum(D.ravel().astype(np.float64), 0.0) ** gamma
    return Y


def diffusion_operator(W: sp.spmatrix, alpha: float) -> sp.csr_matrix:
    """L = I - alpha W as CSR (n, n) float64; SPD for symmetric W with spectral radius <= 1."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = W.shape[0]
    return sp.csr_matrix(sp.identity(n, format="csr") - alpha * sp.csr_matrix(W, dtype=np.float64))


def block_cg(
    A, B: np.ndarray, *, rtol: float = 1e-6, maxiter: int = 100, dtype=np.float64
) -> tuple[np.ndarray, SolveStats]:
    """Solve A X = B column by column with CG recurrences run together.

    Args:
        A: (n, n) SPD sparse matrix, or any object whose `A @ P` multiplies an (n, m) block
           (e.g. `TorchSparse`). B: (n, m) right-hand sides.
        rtol: stop a column when ||b - A x|| <= rtol * ||b||. maxiter: iteration cap.
        dtype: float64 (reference) or float32 (half the memory traffic).
    Returns: X (n, m) of `dtype` and per-column SolveStats (non-converged columns are flagged).
    """
    B = np.asarray(B, dtype=dtype)
    squeeze = B.ndim == 1
    if squeeze:
        B = B[:, None]
    n, m = B.shape
    X = np.zeros((n, m), dtype=dtype)
    R = B.copy()
    bnorm = np.linalg.norm(B, axis=0)
    bnorm_safe = np.where(bnorm > 0, bnorm, 1.0)
    rr = np.einsum("ij,ij->j", R, R).astype(np.float64)
    P = R.copy()
    iters = np.zeros(m, dtype=np.int64)
    active = np.sqrt(rr) > rtol * bnorm_safe
    for _ in range(maxiter):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        full = idx.size == m  # all columns active: work in place, no gather/scatter copies
        Pa = P if full else P[:, idx]
        Q = np.asarray(A @ Pa, dtype=dtype)
        pq = np.einsum("ij,ij->j", Pa, Q)
        a = (rr[idx] / np.where(pq != 0, pq, 1.0)).astype(dtype)
        if full:
            X += Pa * a
            R -= Q * a
            Ra = R
        else:
            X[:, idx] += Pa * a
            R[:, idx] -= Q * a
            Ra = R[:, idx]
        rr_new = np.einsum("ij,ij->j", Ra, Ra)
        beta = (rr_new / np.where(rr[idx] != 0, rr[idx], 1.0)).astype(dtype)
        if full:
            P *= beta
            P += R
        else:
            P[:, idx] = Ra + Pa * beta
        rr[idx] = rr_new
        iters[idx] += 1
        active[idx] = np.sqrt(rr_new) > rtol * bnorm_safe[idx]
    res = np.linalg.norm((B - A @ X).astype(np.float64), axis=0) / bnorm_safe
    slack = 1.01 if dtype == np.float64 else 1.5  # float32 recurrences drift from the true residual
    stats = SolveStats(iters, res, res <= rtol * slack + 1e-12)
    return (X[:, 0] if squeeze else X), stats


class TorchSparse:
    """`A @ P` with torch's multi-threaded CSR x dense kernel (faster than scipy's per-column one)."""

    def __init__(self, A: sp.spmatrix, dtype=np.float32):
        import warnings

        import torch

        A = sp.csr_matrix(A, dtype=dtype)
        self.shape = A.shape
        self.dtype = dtype
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self._t = torch.sparse_csr_tensor(
                torch.from_numpy(A.indptr.astype(np.int64)), torch.from_numpy(A.indices.astype(np.int64)),
                torch.from_numpy(A.data), size=A.shape, check_invariants=False,
            )

    def __matmul__(self, P: np.ndarray) -> np.ndarray:
        import torch

        P = np.ascontiguousarray(P, dtype=self.dtype)
        return (self._t @ torch.from_numpy(P)).numpy()


class ReorderedSparse:
    """`A @ P` on a bandwidth-reducing reordering of A, row blocks multiplied in parallel threads.

    Reverse Cuthill-McKee puts graph neighbours next to each other, so the rows of P a product
    touches stay in cache (2-3x on kNN graphs here); scipy's sparse kernels release the GIL, so
    row blocks run on all cores. Works in the permuted space: use `permute` on right-hand sides and
    `unpermute` on solutions.
    """

    def __init__(self, A: sp.spmatrix, *, dtype=np.float64, threads: int | None = None):
        import os

        from scipy.sparse.csgraph import reverse_cuthill_mckee

        A = sp.csr_matrix(A, dtype=dtype)
        self.shape, self.dtype = A.shape, dtype
        self.perm = reverse_cuthill_mckee(A, symmetric_mode=True).astype(np.int64)
        Ap = A[self.perm][:, self.perm].tocsr()
        self.threads = max(1, threads or os.cpu_count() or 1)
        n = A.shape[0]
        # split rows so that each block holds about the same number of non-zeros
        cuts = np.searchsorted(Ap.indptr, np.linspace(0, Ap.nnz, self.threads + 1)).clip(0, n)
        cuts[0], cuts[-1] = 0, n
        self.blocks = [(int(a), int(b), Ap[a:b]) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        self._pool = None

    def permute(self, Y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(Y[self.perm])

    def unpermute(self, X: np.ndarray) -> np.ndarray:
        out = np.empty_like(X)
        out[self.perm] = X
        return out

    def __matmul__(self, P: np.ndarray) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        P = np.ascontiguousarray(P, dtype=self.dtype)
        if len(self.blocks) == 1:
            return self.blocks[0][2] @ P
        out = np.empty((self.shape[0],) + P.shape[1:], dtype=self.dtype)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self.blocks))

        def run(blk):
            a, b, M = blk
            out[a:b] = M @ P

        list(self._pool.map(run, self.blocks))
        return out


def topk_columns(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column of X (n, m): indices (m, k) of the k largest values, descending, and the values."""
    k = min(k, X.shape[0])
    part = np.argpartition(-X, k - 1, axis=0)[:k].T
    vals = np.take_along_axis(X.T, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(vals, order, 1)


_CG_TOL_KW = "rtol" if "rtol" in inspect.signature(spla.cg).parameters else "tol"


def scipy_cg(A: sp.spmatrix, b: np.ndarray, *, rtol: float = 1e-6, maxiter: int = 100) -> tuple[np.ndarray, int]:
    """One right-hand side with scipy's `cg` (keyword `rtol`, or `tol` on old scipy).

    Returns: x (n,) float64 and scipy's info (0 = converged).
    """
    x, info = spla.cg(A, np.asarray(b, dtype=np.float64), **{_CG_TOL_KW: rtol}, maxiter=maxiter, atol=0.0)
    return x, int(info)


def diffusion_scores(
    W: sp.spmatrix,
    D: np.ndarray,
    I: np.ndarray,
    *,
    alpha: float = 0.99,
    gamma: float = 3.0,
    rtol: float = 1e-6,
    maxiter: int = 100,
) -> tuple[np.ndarray, SolveStats]:
    """Diffusion scores for a batch of queries given their kNN (D, I) in the database.

    Returns: (nq, n) float64 scores x (higher = more relevant) and the solver stats.
    """
    Y = query_vectors(D, I, W.shape[0], gamma=gamma)
    X, stats = block_cg(diffusion_operator(W, alpha), Y, rtol=rtol, maxiter=maxiter)
    nbad = int((~stats.converged).sum())
    if nbad:
        log.warning("diffusion: %d of %d queries did not converge in %d iterations", nbad, Y.shape[1], maxiter)
    return X.T, stats


def graph_neighbourhood(W: sp.csr_matrix, seeds: np.ndarray, m: int) -> np.ndarray:
    """Up to m nodes around `seeds`, breadth first over the graph's edges (the manifold), not by
    Euclidean distance: seeds first, then hop-1 nodes, ..., the last hop cut by edge weight.

    Returns: (<= m,) int64 node ids.
    """
    seeds = np.unique(np.asarray(seeds, dtype=np.int64))
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
    out: list[np.ndarray] = []
    for b0 in range(0, nq, batch):
        Ib, Db = I[b0 : b0 + batch], D[b0 : b0 + batch]
        ok = Ib >= 0
        rows = np.repeat(np.arange(Ib.shape[0]), Ib.shape[1]).reshape(Ib.shape)[ok]
        Y = sp.csr_matrix((np.maximum(Db[ok].astype(np.float64), 0) ** gamma, (rows, Ib[ok])), shape=(Ib.shape[0], n))
        cur, acc = Y, Y.copy()
        for _ in range(hops):
            cur = _keep_top_per_row(sp.csr_matrix(cur @ W) * alpha, beam)
            acc = acc + cur
        seeds = sp.csr_matrix((np.ones(int(ok.sum())), (rows, Ib[ok])), shape=Y.shape)
        acc = _keep_top_per_row(sp.csr_matrix(acc + seeds * 1e30), m)  # the seeds always stay
        out += [acc.indices[acc.indptr[j] : acc.indptr[j + 1]].astype(np.int64) for j in range(acc.shape[0])]
    return out


def truncated_diffusion(
    W: sp.csr_matrix,
    D: np.ndarray,
    I: np.ndarray,
    *,
    m: int = 1000,
    neighbourhoods: np.ndarray | list[np.ndarray] | None = None,
    alpha: float = 0.99,
    gamma: float = 3.0,
    rtol: float = 1e-6,
    maxiter: int = 100,
    select: str = "bfs",
    hops: int = 8,
    beam: int | None = None,
    threads: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], SolveStats]:
    """Diffusion restricted to each query's neighbourhood (Iscen et al. 2017, truncated variant).

    For query q the system is the principal submatrix of (I - alpha W) (still SPD) on m nodes
    around the query: by default its graph neighbourhood (breadth first from its top-kq database
    neighbours, which follows the manifold; select = "mass": the m nodes the first `hops` terms of
    the diffusion series reach with the most mass, see `mass_neighbourhoods`), or the given
    `neighbourhoods[q]` (e.g. its top-m Euclidean neighbours; -1 entries ignored). y comes from
    its top-kq (D, I). Cost per query does not grow with n; when the subgraph holds the whole graph
    it is the exact solve. Chunks of 128 queries run in `threads` threads (default: every core).
    Returns: per query (ids (m,), scores (m,)) sorted by score, and the solver stats.
    """
    nq = I.shape[0]
    if select not in ("bfs", "mass"):
        raise ValueError(f"truncated_diffusion: select must be 'bfs' or 'mass', got {select!r}")

    def solve(q: int, nodes: np.ndarray):
        Ws = W[nodes][:, nodes]
        pos = {int(v): i for i, v in enumerate(nodes)}
        y = np.zeros(nodes.size)
        for d, i in zip(D[q], I[q]):
            if int(i) in pos:
                y[pos[int(i)]] = max(float(d), 0.0) ** gamma
        x, st = block_cg(diffusion_operator(Ws, alpha), y, rtol=rtol, maxiter=maxiter)
        order = np.argsort(-x, kind="stable")
        return nodes[order], x[order], st

    def chunk(bounds: tuple[int, int]) -> list:
        a, b = bounds
        if neighbourhoods is not None:
            nbs = [np.asarray(neighbourhoods[q]) for q in range(a, b)]
            nbs = [v[v >= 0] for v in nbs]
        elif select == "mass":
            nbs = mass_neighbourhoods(W, D[a:b], I[a:b], m, alpha=alpha, gamma=gamma, hops=hops, beam=beam)
        else:
            nbs = [graph_neighbourhood(W, I[q], m) for q in range(a, b)]
        return [solve(q, nodes) for q, nodes in zip(range(a, b), nbs)]

    # chunks of queries in threads: the sparse kernels release the GIL for part of their work
    bounds = [(a, min(a + 128, nq)) for a in range(0, nq, 128)]
    workers = max(1, min(threads or os.cpu_count() or 1, len(bounds)))
    if workers == 1:
        done = [chunk(bd) for bd in bounds]
    else:
        with ThreadPoolExecutor(workers) as ex:
            done = list(ex.map(chunk, bounds))
    flat = [r for part in done for r in part]
    st_i = np.array([r[2].iterations[0] for r in flat], np.int64).reshape(nq)
    st_r = np.array([r[2].residuals[0] for r in flat], np.float64).reshape(nq)
    st_c = np.array([r[2].converged[0] for r in flat], bool).reshape(nq)
    return [r[0] for r in flat], [r[1] for r in flat], SolveStats(st_i, st_r, st_c)


def rank_by_scores(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Rank database items per query by `primary` descending, ties by `secondary` descending.

    Diffusion leaves items outside the query's connected component at score 0; they are then
    ordered by their plain similarity instead of arbitrarily.
    Args: primary, secondary: (nq, n). Returns: (nq, n) int64 indices, best first.
    """
    out = np.empty(primary.shape, dtype=np.int64)
    for q in range(primary.shape[0]):
        out[q] = np.lexsort((-secondary[q], -primary[q]))
    return out


def diffusion_topk(
    W: sp.spmatrix,
    D: np.ndarray,
    I: np.ndarray,
    k: int,
    *,
    alpha: float = 0.99,
    gamma: float = 3.0,
    rtol: float = 1e-6,
    maxiter: int = 100,
    batch: int = 128,
    matmul: str = "scipy",
    dtype=np.float64,
) -> tuple[np.ndarray, np.ndarray, SolveStats]:
    """Top-k diffusion ranking for many queries, solved `batch` right-hand sides at a time.

    Memory is O(n * batch), never O(n * nq). matmul: "scipy" (CSR x dense, reference) or "torch"
    (multi-threaded CSR kernel) or "reordered" (`ReorderedSparse`: RCM order, threaded row blocks).
    Returns ids (nq, k) int64, scores (nq, k) and solver stats.
    """
    n = W.shape[0]
    L = diffusion_operator(W, alpha)
    if matmul == "torch":
        op = TorchSparse(L, dtype=dtype)
    elif matmul == "reordered":
        op = ReorderedSparse(L, dtype=dtype)
    elif matmul == "scipy":
        op = sp.csr_matrix(L, dtype=dtype)
    else:
        raise ValueError(f"unknown matmul {matmul!r}; expected scipy, torch or reordered")
    perm = getattr(op, "permute", lambda Y: Y)
    unperm = getattr(op, "unpermute", lambda X: X)
    nq = I.shape[0]
    k = min(k, n)
    ids = np.empty((nq, k), np.int64)
    scores = np.empty((nq, k), np.float32)
    iters, res, conv = np.zeros(nq, np.int64), np.zeros(nq), np.zeros(nq, bool)
    for a in range(0, nq, batch):
        b = min(a + batch, nq)
        Y = perm(query_vectors(D[a:b], I[a:b], n, gamma=gamma))
        X, st = block_cg(op, Y, rtol=rtol, maxiter=maxiter, dtype=dtype)
        ids[a:b], scores[a:b] = topk_columns(unperm(X), k)
        iters[a:b], res[a:b], conv[a:b] = st.iterations, st.residuals, st.converged
    return ids, scores, SolveStats(iters, res, conv)
