"""The PETSc solve as a ranker: the interface of `retrieval.rankers` with MPI ranks behind it.

Built once per index like every ranker; each `rank(Q, topk)` seeds the queries with the shared
kNN ranker, then runs the distributed CG on `ranks` MPI processes, started by `mpiexec` from
this process (launch = "mpiexec") or placed on the Ray cluster's nodes (launch = "ray"). The
ranks read their rows of the graph from `graph_dir` with `reader` ("module:function").
`PetscScores` puts the same solve behind the region solvers' interface (regional diffusion and the
OS pass on region graphs that outgrow one machine).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.diffusion import SolveStats
from retrieval.rankers import KnnRanker, Ranking

LAUNCHES = ("mpiexec", "ray")


class PetscSolve:
    """The distributed CG on the graph stored in `graph_dir` (the graph stage's row blocks, read by
    each rank with `reader`), its ranks started by `mpiexec` from this process or placed on the Ray
    cluster (launch = "ray"): what the ranker and the region solver below share."""

    def __init__(self, graph_dir: Path, *, reader: str, ranks: int = 2, launch: str = "mpiexec", alpha: float = 0.99,
                 gamma: float = 3.0, rtol: float = 1e-6, maxiter: int = 100, timeout: float | None = None):
        if launch not in LAUNCHES:
            raise ValueError(f"petsc: launch must be one of {LAUNCHES}, got {launch!r}")
        self.graph_dir, self.launch = Path(graph_dir), launch
        self.params = dict(reader=reader, ranks=ranks, alpha=alpha, gamma=gamma, rtol=rtol, maxiter=maxiter, timeout=timeout)

    def topk(self, D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, SolveStats]:
        """Seeds D, I (m, kq) -> the top-k ids, scores (m, k) of each solve, and the CG stats."""
        if self.launch == "ray":
            from .petsc_ray import solve_on_ray as solve
        else:
            from .petsc_solver import solve_with_mpiexec as solve
        params = {key: v for key, v in self.params.items() if not (key == "timeout" and v is None)}
        ids, scores, st = solve(self.graph_dir, D, I, k=k, **params)
        return ids, scores, SolveStats(np.asarray(st["iterations"]), np.asarray(st["residuals"]), np.asarray(st["converged"]))


class PetscRanker(PetscSolve):
    """A ranker (`rank(Q, topk) -> Ranking`): queries seeded by the shared kNN ranker, solved on the ranks."""

    def __init__(self, knn: KnnRanker, graph_dir: Path, *, kq: int = 10, **solve):
        super().__init__(graph_dir, **solve)
        self.knn, self.kq = knn, kq

    def rank(self, Q: np.ndarray, topk: int) -> Ranking:
        D, I = self.knn.seeds(Q, self.kq)
        return Ranking(*self.topk(D, I, min(topk, self.knn.n)))


class PetscScores(PetscSolve):
    """The PETSc solve behind the region solvers' interface (`retrieval.regional.region_solver`):
    `solve(D, I) -> (S (n, m) float32, SolveStats)`, each query's `keep` highest scores scattered
    into its column (zero elsewhere: every score when keep >= n). For regional diffusion on region
    graphs in the graph stage's folder format (`regions/graph`) that outgrow one machine."""

    def __init__(self, graph_dir: Path, n: int, *, keep: int, **solve):
        super().__init__(graph_dir, **solve)
        self.n, self.keep = int(n), min(int(keep), int(n))

    def solve(self, D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, SolveStats]:
        ids, scores, st = self.topk(D, I, self.keep)
        S = np.zeros((self.n, len(ids)), np.float32)
        for q in range(len(ids)):
            ok = ids[q] >= 0
            S[ids[q][ok], q] = scores[q][ok]
        return S, st
