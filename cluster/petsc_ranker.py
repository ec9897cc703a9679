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
        if self.launch == "ray":
            from .petsc_ray import solve_on_ray as solve
        else:
            from .petsc_solver import solve_with_mpiexec as solve
        params = {k: v for k, v in self.params.items() if not (k == "timeout" and v is None)}
        ids, scores, st = solve(self.graph_dir, D, I, k=min(topk, self.knn.n), **params)
        return Ranking(ids, scores, SolveStats(np.asarray(st["iterations"]), np.asarray(st["residuals"]), np.asarray(st["converged"])))
