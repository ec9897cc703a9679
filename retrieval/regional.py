"""Regional diffusion and graph centrality over a region graph (Iscen et al. CVPR 2017; Simeoni et al.).

Every database image keeps a few regional vectors; a region graph is built over all of them with the
graph stage's own code (`retrieval.graph.build_graph`). Then

- **regional diffusion**: the query's regions seed y (each region's top-kq region neighbours, s^gamma,
  summed), (I - alpha W) x = y is solved on the region graph by the same solver as global diffusion,
  and an image's score pools its regions' scores (sum, or max);
- **local search** from one image's regions is the same solve with that image's regions as seeds;
- **global centrality** (Katz): (I - alpha W) g = 1.

Regions are rows 0..M-1; `owner` (M,) int64 gives each region's image row (0..n_images-1).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .diffusion import SolveStats, block_cg, diffusion_operator, topk_columns

POOLS: tuple[str, ...] = ("sum", "max")
EXACT_MAX = 200_000  # region graphs up to this many nodes are solved exactly; larger ones by truncated diffusion


REGION_SOLVERS: tuple[str, ...] = ("auto", "exact", "truncated", "petsc")  # "petsc": cluster/petsc_ranker.PetscScores


class TruncatedScores:
    """Truncated diffusion (`solve(D, I) -> (ids, scores, stats)` of the compiled solver or of
    `retrieval.truncated.TruncatedSolver`) behind the exact solver's interface, `solve(D, I) ->
    (S (n, m) float32, SolveStats)`: each query's subgraph scores scattered into its column, zero off
    the subgraph. What the regional ranker and the object-saliency local search use on region graphs
    too large to solve whole per query (cost per query independent of n)."""

    def __init__(self, solver, n: int):
        self.solver, self.n = solver, int(n)

    def solve(self, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, SolveStats]:
        ids, scores, st = self.solver.solve(D, I)
        S = np.zeros((self.n, len(ids)), np.float32)
        for q, (i, s) in enumerate(zip(ids, scores)):
            S[i, q] = s
        return S, st


def region_solver(knn, V: np.ndarray, W: sp.spmatrix, *, alpha: float = 0.99, gamma: float = 3.0, kq: int = 10, m: int = 2000,
                  select: str = "mass", exact_max: int = EXACT_MAX, solver: str = "auto", **exact):
    """The solver of a region graph: the exact block CG (`retrieval.rankers.DiffusionRanker`, `exact`
    its options) or truncated diffusion on `m`-node subgraphs (the compiled kernel for "mass"
    selection, as the truncated ranker); `solver` "auto" picks exact up to `exact_max` nodes."""
    from .rankers import DiffusionRanker

    if solver not in ("auto", "exact", "truncated"):
        raise ValueError(f"region solver {solver!r} is not built here; known: auto, exact, truncated")
    if solver == "exact" or (solver == "auto" and W.shape[0] <= exact_max):
        return DiffusionRanker(knn, V, W, alpha=alpha, gamma=gamma, kq=kq, **exact)
    cg = {key: exact[key] for key in ("rtol", "maxiter") if key in exact}
    if select == "mass":
        from .truncated_compiled import CompiledTruncatedSolver

        return TruncatedScores(CompiledTruncatedSolver(W, m=m, alpha=alpha, gamma=gamma, **cg), W.shape[0])
    from .truncated import TruncatedSolver

    return TruncatedScores(TruncatedSolver(W, m=m, alpha=alpha, gamma=gamma, select=select, **cg), W.shape[0])


def katz_centrality(W: sp.spmatrix, *, alpha: float = 0.99, rtol: float = 1e-6, maxiter: int = 200) -> tuple[np.ndarray, SolveStats]:
    """Global centrality g (n,) float64 solving (I - alpha W) g = 1 by CG (W (n, n) symmetric normalised)."""
    n = W.shape[0]
    g, st = block_cg(diffusion_operator(W, alpha), np.ones((n, 1)), rtol=rtol, maxiter=maxiter)
    return g[:, 0], st


def group_seeds(D: np.ndarray, I: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeds of region groups: rows of (D, I) ((r, kq) kNN of r query regions) with the same group
    (r,) int64 in 0..n_groups-1 are concatenated into one row, padded with I = -1. Returns
    (n_groups, max_count * kq) D and I, the input of `retrieval.diffusion.query_vectors` (which sums
    the duplicates)."""
    r, kq = I.shape
    counts = np.bincount(groups, minlength=n_groups)
    width = max(int(counts.max(initial=0)), 1) * kq
    Dg = np.zeros((n_groups, width), np.float32)
    Ig = np.full((n_groups, width), -1, np.int64)
    order = np.argsort(groups, kind="stable")
    slot = np.arange(r) - np.repeat(np.cumsum(counts) - counts, counts)  # rank of each row inside its group
    for j, row in zip(slot, order):
        g = groups[row]
        Dg[g, j * kq : (j + 1) * kq] = D[row]
        Ig[g, j * kq : (j + 1) * kq] = I[row]
    return Dg, Ig


def pool_region_scores(S: np.ndarray, owner: np.ndarray, n_images: int, *, pool: str = "sum") -> np.ndarray:
    """Image scores (n_images, m) from region scores S (M, m): the sum or the max of each image's regions."""
    if pool == "sum":
        P = sp.csr_matrix((np.ones(len(owner)), (owner, np.arange(len(owner)))), shape=(n_images, len(owner)))
        return np.asarray(P @ S)
    if pool == "max":
        out = np.full((n_images, S.shape[1]), -np.inf)
        np.maximum.at(out, owner, S)
        return np.where(np.isfinite(out), out, 0.0)
    raise ValueError(f"unknown region pooling {pool!r}; known: {list(POOLS)}")


class RegionalDiffusionRanker:
    """Regional diffusion over a region graph: rankings of *images* from queries given as region sets.

    Args:
        region_knn: searches the M region vectors (`retrieval.rankers.KnnRanker` over them).
        solver: solves the region graph for seeds, `solve(D, I) -> (S (M, m), SolveStats)`
            (`retrieval.rankers.DiffusionRanker` built on the region graph).
        owner: (M,) int64 image row of every region; n_images: number of images.
        kq: region neighbours per query region; pool: "sum" or "max" of an image's region scores.
    """

    def __init__(self, region_knn, solver, owner: np.ndarray, n_images: int, *, kq: int = 10, pool: str = "sum"):
        if pool not in POOLS:
            raise ValueError(f"unknown region pooling {pool!r}; known: {list(POOLS)}")
        self.knn, self.solver, self.kq, self.pool = region_knn, solver, kq, pool
        self.owner = np.asarray(owner, np.int64)
        self.n = int(n_images)

    def rank_regions(self, regions: list[np.ndarray], topk: int):
        """Queries as region sets (each (R_q, d) float32 L2-normalised) -> `Ranking` of image rows."""
        from .rankers import Ranking

        groups = np.repeat(np.arange(len(regions)), [len(r) for r in regions])
        D, I = self.knn.search(np.concatenate(regions).astype(np.float32), self.kq)
        Dg, Ig = group_seeds(D, I, groups, len(regions))
        S, st = self.solver.solve(Dg, Ig)
        ids, scores = topk_columns(pool_region_scores(S, self.owner, self.n, pool=self.pool), min(topk, self.n))
        return Ranking(ids, scores, st)

    def rank(self, Q: np.ndarray, topk: int):
        """Query vectors (nq, d) in the regional space, each taken as a one-region query."""
        return self.rank_regions([q[None] for q in Q], topk)
