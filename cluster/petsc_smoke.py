"""Smoke check of the PETSc/MPI route: run with `mpiexec -n P python -m cluster.petsc_smoke`.

Each rank fills only its own rows of a distributed AIJ matrix L = I - alpha W (W a seeded
normalised random graph), KSP CG solves L x = y, and rank 0 compares x with scipy's solution.
Prints `PETSC_SMOKE_OK ranks=P err=...` on success; exits 1 otherwise.
"""
from __future__ import annotations

import sys

import numpy as np


def main(n: int = 400, alpha: float = 0.9, seed: int = 0) -> int:
    import petsc4py

    petsc4py.init(sys.argv[:1])
    from mpi4py import MPI
    from petsc4py import PETSc
    import scipy.sparse as sp
    import scipy.sparse.linalg  # noqa: F401  (sp.linalg)

    comm = PETSc.COMM_WORLD
    rng = np.random.default_rng(seed)  # every rank builds the same small graph; owns only its rows
    A = sp.random(n, n, density=0.02, random_state=seed, format="csr")
    A = A + A.T
    d = np.asarray(A.sum(axis=1)).ravel()
    inv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-300)), 0.0)
    W = sp.diags(inv) @ A @ sp.diags(inv)
    L = sp.csr_matrix(sp.identity(n) - alpha * W)
    y = rng.random(n)

    M = PETSc.Mat().createAIJ(size=((None, n), (None, n)), comm=comm)
    M.setUp()
    r0, r1 = M.getOwnershipRange()
    for i in range(r0, r1):
        cols = L.indices[L.indptr[i] : L.indptr[i + 1]]
        M.setValues([i], cols, L.data[L.indptr[i] : L.indptr[i + 1]])
    M.assemblyBegin()
    M.assemblyEnd()
    b = M.createVecLeft()
    b.setValues(range(r0, r1), y[r0:r1])
    b.assemblyBegin()
    b.assemblyEnd()
    x = M.createVecRight()
    ksp = PETSc.KSP().create(comm)
    ksp.setOperators(M)
    ksp.setType("cg")
    ksp.getPC().setType("none")
    ksp.setTolerances(rtol=1e-10, max_it=1000)
    ksp.solve(b, x)
    local = x.getArray().copy()
    parts = MPI.COMM_WORLD.gather((r0, local), root=0)
    if MPI.COMM_WORLD.rank == 0:
        full = np.zeros(n)
        for s, arr in parts:
            full[s : s + arr.size] = arr
        ref = sp.linalg.spsolve(L.tocsc(), y)
        err = float(np.abs(full - ref).max() / np.abs(ref).max())
        ok = err < 1e-6 and ksp.getConvergedReason() > 0
        print(f"PETSC_SMOKE_{'OK' if ok else 'FAIL'} ranks={comm.getSize()} iterations={ksp.getIterationNumber()} err={err:.2e}", flush=True)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
