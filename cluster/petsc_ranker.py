"""The PETSc solve as a ranker: the interface of `retrieval.rankers` with MPI ranks behind it.

Built once per index like every ranker; each `rank(Q, topk)` seeds the queries with the shared
kNN ranker, then runs the distributed CG on `ranks` MPI processes, started by `mpiexec` from
this process (launch = "mpiexec") or placed on the Ray cluster's nodes (launch = "ray"). The
ranks read their rows of the graph from `graph_dir` with `reader` ("module:function").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.diffusion import SolveStats
from retrieval.rankers import KnnRanker, Ranking

LAUNCHES = ("mpiexec", "ray")


class PetscRanker:
    def __init__(self, knn: KnnRanker, graph_dir: Path, *, reader: str, ranks: int = 2, launch: str = "mpiexec", alpha: float = 0.99,
                 gamma: float = 3.0, kq: int = 10, rtol: float = 1e-6, maxiter: int = 100, timeout: float | None = None):
        if launch not in LAUNCHES:
            raise ValueError(f"petsc: launch must be one of {LAUNCHES}, got {launch!r}")
        self.knn, self.graph_dir, self.kq, self.launch = knn, Path(graph_dir), kq, launch
        self.params = dict(reader=reader, ranks=ranks, alpha=alpha, gamma=gamma, rtol=rtol, maxiter=maxiter, timeout=timeout)

    def rank(self, Q: np.ndarray, topk: int) -> Ranking:
        D, I = self.knn.seeds(Q, self.kq)
        ids, scores, st = _solve(self.launch, self.graph_dir, D, I, min(topk, self.knn.n), self.params)
        return Ranking(ids, scores, st)


def _solve(launch: str, graph_dir: Path, D: np.ndarray, I: np.ndarray, k: int, params: dict) -> tuple[np.ndarray, np.ndarray, SolveStats]:
    """The distributed CG for seeds D, I (m, kq) on the graph in graph_dir: top-k ids, scores (m, k)."""
    if launch == "ray":
        from .petsc_ray import solve_on_ray as solve
    else:
        from .petsc_solver import solve_with_mpiexec as solve
    params = {key: v for key, v in params.items() if not (key == "timeout" and v is None)}
    ids, scores, st = solve(graph_dir, D, I, k=k, **params)
    return ids, scores, SolveStats(np.asarray(st["iterations"]), np.asarray(st["residuals"]), np.asarray(st["converged"]))


class PetscScores:
    """The PETSc solve behind the region solvers' interface (`retrieval.regional.region_solver`):
    `solve(D, I) -> (S (n, m) float32, SolveStats)`, each query's `keep` highest scores scattered
    into its column (zero elsewhere: every score when keep >= n). For regional diffusion on region
    graphs in the graph stage's folder format (`regions/graph`) that outgrow one machine."""

    def __init__(self, graph_dir: Path, n: int, *, reader: str, keep: int, ranks: int = 2, launch: str = "mpiexec",
                 alpha: float = 0.99, gamma: float = 3.0, rtol: float = 1e-6, maxiter: int = 100, timeout: float | None = None):
        if launch not in LAUNCHES:
            raise ValueError(f"petsc: launch must be one of {LAUNCHES}, got {launch!r}")
        self.graph_dir, self.n, self.keep, self.launch = Path(graph_dir), int(n), min(int(keep), int(n)), launch
        self.params = dict(reader=reader, ranks=ranks, alpha=alpha, gamma=gamma, rtol=rtol, maxiter=maxiter, timeout=timeout)

    def solve(self, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, SolveStats]:
        ids, scores, st = _solve(self.launch, self.graph_dir, D, I, self.keep, self.params)
        S = np.zeros((self.n, len(ids)), np.float32)
        for q in range(len(ids)):
            ok = ids[q] >= 0
            S[ids[q][ok], q] = scores[q][ok]
        return S, st
