"""Distributed diffusion solve with PETSc CG under MPI.

Run by the pipeline as
    mpiexec -n P python -m cluster.petsc_solver GRAPH_DIR RHS.npz OUT_DIR --alpha .. --rtol .. --maxiter .. --topk ..
Each rank owns a contiguous range of rows, loads only the graph row blocks that overlap it,
assembles its rows of L = I - alpha W into a distributed AIJ matrix, and solves L x = y for every
query with KSP CG. Each rank writes the top-k of its own rows per query (`OUT_DIR/rank-R.npz`);
rank 0 also writes the per-query iterations, residuals and convergence (`OUT_DIR/stats.npz`).
`solve_with_mpiexec` launches it and merges the per-rank top-k lists.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _local_rows(graph_dir: Path, r0: int, r1: int):
    """CSR rows [r0, r1) of W assembled from the row blocks that overlap them (global columns)."""
    import scipy.sparse as sp

    manifest = json.loads((graph_dir / "manifest.json").read_text())
    n = manifest["n"]
    parts = []
    for b in manifest["blocks"]:
        s, e = b["row_start"], b["row_stop"]
        if e <= r0 or s >= r1:
            continue
        with np.load(graph_dir / b["file"], allow_pickle=False) as z:
            blk = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(e - s, n))
        parts.append(blk[max(r0, s) - s : min(r1, e) - s])
    if not parts:
        return sp.csr_matrix((r1 - r0, n), dtype=np.float64), n
    return sp.vstack(parts, format="csr"), n


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("graph_dir", type=Path)
    ap.add_argument("rhs", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--alpha", type=float, default=0.99)
    ap.add_argument("--gamma", type=float, default=3.0)
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--maxiter", type=int, default=100)
    ap.add_argument("--topk", type=int, default=100)
    args = ap.parse_args(argv)

    import petsc4py

    petsc4py.init([sys.argv[0]])
    import scipy.sparse as sp
    from petsc4py import PETSc

    comm = PETSc.COMM_WORLD
    rank, size = comm.getRank(), comm.getSize()
    n = json.loads((args.graph_dir / "manifest.json").read_text())["n"]
    r0, r1 = n * rank // size, n * (rank + 1) // size
    Wloc, _ = _local_rows(args.graph_dir, r0, r1)
    nloc = r1 - r0
    # local rows of L = I - alpha W (global column indices)
    Lloc = sp.csr_matrix(-args.alpha * Wloc.astype(np.float64))
    Lloc = Lloc + sp.csr_matrix((np.ones(nloc), (np.arange(nloc), np.arange(r0, r1))), shape=(nloc, n))
    Lloc.sort_indices()
    L = PETSc.Mat().createAIJ(size=((nloc, n), (nloc, n)), csr=(Lloc.indptr.astype(PETSc.IntType), Lloc.indices.astype(PETSc.IntType), Lloc.data), comm=comm)
    L.assemble()

    with np.load(args.rhs, allow_pickle=False) as z:
        D, I = z["D"], z["I"]
    nq = I.shape[0]
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
        y = np.zeros(nloc)
        sel = (I[q] >= r0) & (I[q] < r1)
        y[I[q][sel] - r0] = np.maximum(D[q][sel], 0.0) ** args.gamma
        b.setArray(y)
        x.set(0.0)
        ksp.solve(b, x)
        L.mult(x, r)
        r.aypx(-1.0, b)  # r = b - L x
        bnorm = b.norm()
        iters[q] = ksp.getIterationNumber()
        res[q] = r.norm() / bnorm if bnorm > 0 else 0.0
        conv[q] = ksp.getConvergedReason() > 0
        if k:
            xl = x.getArray()
            part = np.argpartition(-xl, k - 1)[:k]
            order = part[np.argsort(-xl[part], kind="stable")]
            top_ids[q], top_sc[q] = order + r0, xl[order]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(args.out_dir / f"rank-{rank:04d}.npz", ids=top_ids, scores=top_sc, r0=r0, r1=r1)
    if rank == 0:
        np.savez(args.out_dir / "stats.npz", iterations=iters, residuals=res, converged=conv, ranks=size)
    return 0


def solve_with_mpiexec(
    graph_dir: Path,
    D: np.ndarray,
    I: np.ndarray,
    *,
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

    `hosts` ("ip1:slots,ip2:slots", OpenMPI's --host) places the ranks on several machines; then
    `work_dir` (right-hand sides and per-rank results) and the graph must be on storage they share.
    """
    from retrieval.knn import merge_topk

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="petsc-solve-", dir=work_dir) as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "rhs.npz", D=D.astype(np.float64), I=I.astype(np.int64))
        cmd = ["mpiexec", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks)] + (["--host", hosts] if hosts else []) + [
               sys.executable, "-m", "cluster.petsc_solver",
               str(graph_dir), str(tmp / "rhs.npz"), str(tmp / "out"), f"--alpha={alpha}", f"--gamma={gamma}", f"--rtol={rtol}",
               f"--maxiter={maxiter}", f"--topk={k}"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        root = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"PETSc solve failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        Ds, Is = [], []
        for p in sorted((tmp / "out").glob("rank-*.npz")):
            with np.load(p, allow_pickle=False) as z:
                if z["ids"].shape[1]:
                    Is.append(z["ids"])
                    Ds.append(z["scores"])
        with np.load(tmp / "out" / "stats.npz", allow_pickle=False) as z:
            stats = {name: z[name] for name in ("iterations", "residuals", "converged")}
    Dm, Im = merge_topk(Ds, Is, k)
    return Im, Dm, stats


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
