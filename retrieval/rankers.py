"""Rankers: one ranking method built once over one index, answering batches of queries.

A ranker is built from the database vectors (and, for the manifold methods, the graph) with the
method's parameters, keeps what every query needs (the database block, the diffusion operator and its
reordering, the truncated solver's graph and position maps, the spectral embedding)
and answers `rank(Q, topk) -> Ranking`. The query stage, the service, the batch query job and the
benchmarks all rank through these objects; the PETSc ranker (cluster/petsc_ranker.py) answers the
same interface with its own process layout behind it.

Ranked ids are database *rows* (0..n-1); callers map rows to their own ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from .diffusion import (
    SolveStats, block_cg, diffusion_operator, query_vectors, query_vectors_sparse, rank_by_scores, sparse_operator, topk_columns,
)
from .knn import exact_search, flat_search, search_index
from .precomputed import ItemRows, RowCombiner
from .query_expansion import alpha_qe
from .spectral import SpectralEmbedding
from .truncated import TruncatedSolver

# Every ranking method, in report order: the one registry of names (config checking, the service,
# evaluation order and the stage's builders all read it).
METHODS: tuple[str, ...] = ("knn", "aqe", "diffusion", "truncated", "precomputed", "spectral", "petsc", "regional")
GRAPH_METHODS: frozenset[str] = frozenset({"diffusion", "truncated", "precomputed", "spectral", "petsc"})
# engines of truncated diffusion's mass selection: the compiled kernel, or scipy (the reference)
KERNELS: tuple[str, ...] = ("compiled", "scipy")
# rankings up to this long take their padding from the seeds' own exact search (one search for both)
PAD_SEARCH_MAX = 10_000
# methods that rank region sets over the region graph (`retrieval.regional`), not global vectors
REGION_METHODS: frozenset[str] = frozenset({"regional"})


@dataclass(frozen=True)
class Ranking:
    """ids (nq, k) int64 database rows, best first; scores (nq, k) float32; per-query CG stats for
    the solvers (None for the others)."""

    ids: np.ndarray
    scores: np.ndarray
    stats: SolveStats | None = None


class Ranker(Protocol):
    def rank(self, Q: np.ndarray, topk: int) -> Ranking:
        """Q (nq, d) float32 L2-normalised queries -> the top-`topk` database rows of each."""
        ...


class KnnRanker:
    """Exact inner-product search over X (n, d) float32 (kept contiguous, as given): one pass over
    X and a partial sort (`retrieval.knn.exact_search`, `retrieval.scan`) for batches under
    `faiss_from` queries (1 to 8 queries: 1.5-3.6x faster), faiss's flat search over X from there
    (1.1-1.5x faster from 16 queries up; BENCHMARKS.md).

    seed_index: an approximate faiss index (HNSW or IVF) over the same rows, or None: the graph
    methods then take their kq seeds from it (`seeds`), a fraction of the exact search's cost at
    10^6 (BENCHMARKS.md); rankings by similarity (`search`) stay exact."""

    def __init__(self, X: np.ndarray, *, faiss_from: int = 16, seed_index=None):
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        if not np.isfinite(self.X).all():
            raise ValueError("database has NaN/inf values")
        self.n = self.X.shape[0]
        self.faiss_from = faiss_from
        self.seed_index = seed_index

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) (nq, min(k, n)): similarities descending and int64 rows."""
        if len(Q) < self.faiss_from:
            return exact_search(Q, self.X, k)
        return flat_search(Q, self.X, k)  # faiss's flat search over X itself (checked once, here; no index copy)

    def seeds(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k database rows that seed a graph method's query: (D, I) (nq, min(k, n)) from
        `seed_index` when one is set (approximate; -1 where it found fewer), exact otherwise."""
        index = self.seed_index
        if index is None:
            return self.search(Q, k)
        if index.ntotal != self.n:
            raise ValueError(f"the seed index has {index.ntotal} rows but the database has {self.n}")
        return search_index(index, Q, k, database=self.X)  # a quantized index's seeds re-scored on the rows

    def seeds_and_neighbours(self, Q: np.ndarray, kq: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A graph method's seeds (D, I) (nq, >= kq) and, when one exact search serves both, each
        query's top k rows (nq, k) to pad a ranking shorter than k (else None: `pad_with_knn`
        searches only the short ones). With a seed index the seeds are approximate and the padding
        is searched exactly later; without, one search of max(kq, k) does both (up to
        PAD_SEARCH_MAX; longer rankings search only the queries that need it)."""
        if self.seed_index is not None:
            D, I = self.seeds(Q, kq)
            return D, I, None
        D, I = self.search(Q, max(kq, k) if k <= PAD_SEARCH_MAX else kq)
        return D, I, I

    def rank(self, Q: np.ndarray, topk: int) -> Ranking:
        D, I = self.search(Q, topk)
        return Ranking(I, D)


class AqeRanker:
    """alpha-QE: each query averaged with its top-n neighbours weighted by similarity^alpha, then searched."""

    def __init__(self, knn: KnnRanker, X: np.ndarray, *, n: int = 2, alpha: float = 3.0):
        self.knn, self.X, self.n, self.alpha = knn, X, n, alpha

    def rank(self, Q: np.ndarray, topk: int) -> Ranking:
        D, I = self.knn.search(Q, self.n)
        return self.knn.rank(alpha_qe(Q, self.X, I, D, n=self.n, alpha=self.alpha), topk)


class DiffusionRanker:
    """Exact diffusion: block CG on (I - alpha W) x = y over the whole graph, `batch` right-hand
    sides per sparse product. The operator (and its reordering: `order` (n,) position -> node, RCM
    when None) is built once, here.

    A full ranking (topk >= n, small enough to hold (nq, n) scores) orders the items the diffusion
    does not reach by plain similarity instead of arbitrarily."""

    def __init__(self, knn: KnnRanker, X: np.ndarray, W: sp.spmatrix, *, alpha: float = 0.99, gamma: float = 3.0, kq: int = 10,
                 rtol: float = 1e-6, maxiter: int = 100, batch: int = 128, matmul: str = "reordered", dtype=np.float64,
                 order: np.ndarray | None = None, full_limit: int = 50_000_000):
        self.knn, self.X = knn, X
        self.gamma, self.kq, self.rtol, self.maxiter, self.batch, self.dtype = gamma, kq, rtol, maxiter, batch, dtype
        self.full_limit = full_limit
        self.op = sparse_operator(diffusion_operator(W, alpha), matmul, dtype=dtype, perm=order)
        self.n = W.shape[0]

    def solve(self, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, SolveStats]:
        """Scores (n, m) in node order for seeds D, I (m, kq), one block CG on the operator."""
        Y = self.op.permute(query_vectors(D, I, self.n, gamma=self.gamma))
        fused = getattr(self.op, "cg", None)  # the compiled operator brings its own fused recurrences
        X, st = fused(Y, rtol=self.rtol, maxiter=self.maxiter) if fused else block_cg(self.op, Y, rtol=self.rtol, maxiter=self.maxiter,
                                                                                      dtype=self.dtype)
        return self.op.unpermute(X), st

    def rank(self, Q: np.ndarray, topk: int) -> Ranking:
        n, nq = self.n, Q.shape[0]
        k = min(topk, n)
        full = k == n and n * nq <= self.full_limit
        D, I = self.knn.seeds(Q, self.kq)
        ids, scores = np.empty((nq, k), np.int64), np.empty((nq, k), np.float32)
        iters, res, conv = np.zeros(nq, np.int64), np.zeros(nq), np.zeros(nq, bool)
        for a in range(0, nq, self.batch):
            b = min(a + self.batch, nq)
            S, st = self.solve(D[a:b], I[a:b])
            if full:
                ids[a:b] = rank_by_scores(S.T, Q[a:b] @ self.X.T)
                scores[a:b] = np.take_along_axis(S.T, ids[a:b], axis=1)
            else:
                ids[a:b], scores[a:b] = topk_columns(S, k)
            iters[a:b], res[a:b], conv[a:b] = st.iterations, st.residuals, st.converged
        return Ranking(ids, scores, SolveStats(iters, res, conv))


def pad_with_knn(knn: KnnRanker, Q: np.ndarray, ids_list: list[np.ndarray], sc_list: list[np.ndarray], k: int, *,
                 neighbours: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(nq, k) rankings from per-query lists that may be shorter than k: the rest of each ranking
    is filled with the remaining items by plain similarity (score 0). `neighbours` (nq, >= k), each
    query's top database rows when the caller has searched them already, saves the search."""
    nq = len(ids_list)
    out_i, out_s = np.empty((nq, k), np.int64), np.zeros((nq, k), np.float32)
    short = [q for q, ids in enumerate(ids_list) if len(ids) < k]  # only these are searched
    rest: dict[int, np.ndarray] = {}
    if short and neighbours is not None and neighbours.shape[1] >= k:
        rest = {q: neighbours[q, :k] for q in short}
    elif short:
        Ik = knn.search(Q[short], k)[1]  # at most len(ids) of the top k are in a list: enough remain
        rest = dict(zip(short, Ik))
    for q, (ids, sc) in enumerate(zip(ids_list, sc_list)):
        ids, sc = ids[:k], sc[:k]
        if ids.size < k:
            ids = np.concatenate([ids, rest[q][~np.isin(rest[q], ids)][: k - ids.size]])
        out_i[q], out_s[q, : sc.size] = ids, sc
    return out_i, out_s


class TruncatedRanker:
    """Truncated diffusion, each query solved on its subgraph of m nodes, the rest of the ranking
    by plain similarity. Mass selection runs in the compiled kernel
    (retrieval.truncated_compiled, kernel="compiled"); kernel="scipy" and breadth-first selection
    run retrieval.truncated.TruncatedSolver, the reference it is tested against."""

    def __init__(self, knn: KnnRanker, W: sp.spmatrix, *, kq: int = 10, kernel: str = "compiled", **solver):
        self.knn, self.kq = knn, kq
        if kernel not in KERNELS:
            raise ValueError(f"truncated diffusion: kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "compiled" and solver.get("select", "mass") == "mass":
            from .truncated_compiled import CompiledTruncatedSolver

            solver.pop("select", None)
            self.solver = CompiledTruncatedSolver(W, **solver)
        else:
            self.solver = TruncatedSolver(W, **solver)

    def rank(self, Q: np.ndarray, topk: int) -> Ranking:
        k = min(topk, self.knn.n)
        D, I, near = self.knn.seeds_and_neighbours(Q, self.kq, k)
        ids, sc, st = self.solver.solve(D[:, : self.kq], I[:, : self.kq])
        I2, S2 = pad_with_knn(self.knn, Q, ids, sc, k, neighbours=near)
        return Ranking(I2, S2, st)


class PrecomputedRanker:
    """Database-side truncated diffusion (`retrieval.precomputed`): a query's kq seeds' precomputed
    rows summed, weighted by similarity^gamma; the rest of the ranking by plain similarity. No
    solve at query time: the ranking costs the seed search and kq rows' worth of entries."""

    def __init__(self, knn: KnnRanker, rows: ItemRows, *, gamma: float = 3.0, kq: int = 10, threads: int | None = None):
        if rows.n != knn.n:
            raise ValueError(f"the precomputed rows cover {rows.n} items but the database has {knn.n}")
        self.knn, self.gamma, self.kq = knn, gamma, kq
        self.combiner = RowCombiner(rows, threads=threads)

    def rank(self, Q: np.ndarray, topk: int) -> Ranking:
        k = min(topk, self.knn.n)
        D, I, near = self.knn.seeds_and_neighbours(Q, self.kq, k)
        Y = np.maximum(np.asarray(D[:, : self.kq], np.float64), 0.0) ** self.gamma
        ids, sc = self.combiner.top(Y, I[:, : self.kq], k)
        I2, S2 = pad_with_knn(self.knn, Q, ids, sc, k, neighbours=near)
        return Ranking(I2, S2)


class SpectralRanker:
    """Fast spectral ranking: the offline embedding V (n, r) (given, computed once per graph); a
    query is its seeds' embedding z, searched against V by inner product."""

    def __init__(self, knn: KnnRanker, emb: SpectralEmbedding, *, gamma: float = 3.0, kq: int = 10):
        self.knn, self.emb, self.gamma, self.kq = knn, emb, gamma, kq
        self.V = KnnRanker(emb.V)

    def rank(self, Q: np.ndarray, topk: int) -> Ranking:
        D, I = self.knn.seeds(Q, self.kq)
        Z = self.emb.query(query_vectors_sparse(D, I, self.knn.n, gamma=self.gamma))
        return self.V.rank(Z, topk)
