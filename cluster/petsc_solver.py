"""Distributed diffusion solve with PETSc CG under MPI.

Run by the pipeline as
    mpiexec -n P python -m cluster.petsc_solver GRAPH_DIR RHS.npz OUT_DIR --reader MOD:FN --alpha .. --rtol .. --maxiter .. --topk ..
Each rank owns a contiguous range of rows, loads only the graph row blocks that overlap it (with
the reader it is handed), assembles its rows of L = I - alpha W (retrieval.diffusion) into a
distributed AIJ matrix, and solves L x = y for every
query with KSP CG. Each rank writes the top-k of its own rows per query (`OUT_DIR/rank-R.npz`);
rank 0 also writes the per-query iterations, residuals and convergence (`OUT_DIR/stats.npz`).
`solve_with_mpiexec` launches it and merges the per-rank top-k lists.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ClusterError

log = logging.getLogger(__name__)


def load_reader(spec: str) -> Callable[[Path, int, int], "object"]:
    """The graph-rows reader named "module:function" (handed over by the caller, so the engine
    does not import the stage layer that owns the graph format): reader(graph_dir, r0, r1) -> CSR."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"petsc: reader must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("graph_dir", type=Path)
    ap.add_argument("rhs", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--reader", required=True, help="module:function reading rows [r0, r1) of the graph")
    ap.add_argument("--alpha", type=float, default=0.99)
    ap.add_argument("--gamma", type=float, default=3.0)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--maxiter", type=int, default=100)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--katz", action="store_true", help="solve L g = 1 (Katz centrality) instead; each rank saves its rows of g")
    args = ap.parse_args(argv)

    import petsc4py

    petsc4py.init([sys.argv[0]])
    from petsc4py import PETSc

    from retrieval.diffusion import diffusion_operator_rows, query_vectors_sparse, topk_columns

    comm = PETSc.COMM_WORLD
    rank, size = comm.getRank(), comm.getSize()
    n = json.loads((args.graph_dir / "manifest.json").read_text())["n"]
    r0, r1 = n * rank // size, n * (rank + 1) // size
    nloc = r1 - r0
    Lloc = diffusion_operator_rows(load_reader(args.reader)(args.graph_dir, r0, r1), r0, args.alpha)  # this rank's rows of L
    L = PETSc.Mat().createAIJ(size=((nloc, n), (nloc, n)), csr=(Lloc.indptr.astype(PETSc.IntType), Lloc.indices.astype(PETSc.IntType), Lloc.data), comm=comm)
    L.assemble()

    if args.katz:
        nq, Y = 1, None
    else:
        with np.load(args.rhs, allow_pickle=False) as z:
            D, I = z["D"], z["I"]
        nq = I.shape[0]
        Y = query_vectors_sparse(D, I, n, gamma=args.gamma)[r0:r1].tocsc()  # this rank's rows of every y
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(L)
    ksp.setType("cg")
    ksp.getPC().setType("none")
    ksp.setTolerances(rtol=args.rtol, atol=0.0, max_it=args.maxiter)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    b, x = L.createVecs()
    k = min(args.topk, nloc) if nloc else 0
    top_ids = np.zeros((nq, k), np.int64)
    top_sc = np.zeros((nq, k), np.float32)
    iters, res, conv = np.zeros(nq, np.int64), np.zeros(nq), np.zeros(nq, bool)
    r = b.duplicate()
    for q in range(nq):
        b.setArray(np.ones(nloc) if args.katz else Y[:, q].toarray().ravel())
        x.set(0.0)
        ksp.solve(b, x)
        L.mult(x, r)
        r.aypx(-1.0, b)  # r = b - L x
        bnorm = b.norm()
        iters[q] = ksp.getIterationNumber()
        res[q] = r.norm() / bnorm if bnorm > 0 else 0.0
        conv[q] = ksp.getConvergedReason() > 0
        if k and not args.katz:
            ids, sc = topk_columns(x.getArray()[:, None], k)
            top_ids[q], top_sc[q] = ids[0] + r0, sc[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.katz:
        np.savez(args.out_dir / f"rank-{rank:04d}.npz", g=x.getArray().copy(), r0=r0, r1=r1)
    else:
        np.savez(args.out_dir / f"rank-{rank:04d}.npz", ids=top_ids, scores=top_sc, r0=r0, r1=r1)
    if rank == 0:
        np.savez(args.out_dir / "stats.npz", iterations=iters, residuals=res, converged=conv, ranks=size)
    return 0


SETUP_HINT = "install Open MPI, PETSc and petsc4py with `deploy/setup.sh --petsc`"


def _failure(code: int, stderr: str) -> str:
    """One line on why the MPI ranks failed: a missing petsc4py/mpi4py named with the fix, else the
    last line the ranks printed."""
    for module in ("petsc4py", "mpi4py"):
        if f"No module named '{module}'" in stderr:
            return f"PETSc solve: {module} is not installed: {SETUP_HINT}"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no output")
    return f"PETSc solve failed (exit {code}): {last[-300:]}"


def _run_ranks(graph_dir: Path, tmp: Path, extra: list[str], *, reader: str, ranks: int, alpha: float, rtol: float, maxiter: int,
               timeout: float | None, hosts: str | None) -> dict:
    """mpiexec `ranks` processes of this module on the graph in graph_dir, results under tmp/out;
    returns the CG stats rank 0 wrote. A failure is a one-line ClusterError."""
    cmd = ["mpiexec", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks)] + (["--host", hosts] if hosts else []) + [
           sys.executable, "-m", "cluster.petsc_solver", str(graph_dir), str(tmp / "rhs.npz"), str(tmp / "out"), f"--reader={reader}",
           f"--alpha={alpha}", f"--rtol={rtol}", f"--maxiter={maxiter}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except FileNotFoundError:
        raise ClusterError(f"PETSc solve: mpiexec not found: {SETUP_HINT}") from None
    if proc.returncode != 0:
        raise ClusterError(_failure(proc.returncode, proc.stderr))
    with np.load(tmp / "out" / "stats.npz", allow_pickle=False) as z:
        return {name: z[name] for name in ("iterations", "residuals", "converged")}


def solve_with_mpiexec(
    graph_dir: Path,
    D: np.ndarray,
    I: np.ndarray,
    *,
    reader: str,
    ranks: int,
    k: int,
    alpha: float = 0.99,
    gamma: float = 3.0,
    rtol: float = 1e-6,
    maxiter: int = 100,
    timeout: float | None = None,
    hosts: str | None = None,
    work_dir: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Run the PETSc solve on `ranks` MPI processes; merged top-k ids/scores (nq, k) and stats.

    `reader` ("module:function") reads rows [r0, r1) of the graph in `graph_dir` in each rank.

    `hosts` ("ip1:slots,ip2:slots", OpenMPI's --host) places the ranks on several machines; then
    `work_dir` (right-hand sides and per-rank results) and the graph must be on storage they share.
    """
    from retrieval.knn import merge_topk

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="petsc-solve-", dir=work_dir) as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "rhs.npz", D=D.astype(np.float64), I=I.astype(np.int64))
        stats = _run_ranks(graph_dir, tmp, [f"--gamma={gamma}", f"--topk={k}"], reader=reader, ranks=ranks, alpha=alpha, rtol=rtol,
                           maxiter=maxiter, timeout=timeout, hosts=hosts)
        Ds, Is = [], []
        for p in sorted((tmp / "out").glob("rank-*.npz")):
            with np.load(p, allow_pickle=False) as z:
                if z["ids"].shape[1]:
                    Is.append(z["ids"])
                    Ds.append(z["scores"])
    Dm, Im = merge_topk(Ds, Is, k)
    return Im, Dm, stats


def katz_with_mpiexec(graph_dir: Path, *, reader: str, ranks: int, alpha: float = 0.99, rtol: float = 1e-6, maxiter: int = 200,
                      timeout: float | None = None, hosts: str | None = None, work_dir: Path | None = None) -> tuple[np.ndarray, dict]:
    """Katz centrality g (n,) float64 of the graph in graph_dir, (I - alpha W) g = 1 solved by CG on
    `ranks` MPI processes (each reads and solves its rows), and the CG stats (one right-hand side)."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="petsc-katz-", dir=work_dir) as tmp:
        tmp = Path(tmp)
        stats = _run_ranks(graph_dir, tmp, ["--katz"], reader=reader, ranks=ranks, alpha=alpha, rtol=rtol, maxiter=maxiter,
                           timeout=timeout, hosts=hosts)
        parts = []
        for p in sorted((tmp / "out").glob("rank-*.npz")):
            with np.load(p, allow_pickle=False) as z:
                parts.append((int(z["r0"]), z["g"]))
    return np.concatenate([g for _, g in sorted(parts, key=lambda t: t[0])]), stats


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
