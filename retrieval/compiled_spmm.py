"""Sparse x dense block product `A @ P` as a compiled kernel, for block CG on large graphs.

One loop per row block, run in a thread per core (the kernel releases the GIL): for each row, each
non-zero's row of P (b contiguous values) is scaled and added into the output row, which stays in
registers/L1 while the row is summed; numba vectorises the loop over the b columns. The graph is in
reverse Cuthill-McKee order (the rows a block gathers are near each other, so they are reused from
cache) with 32-bit column ids. `retrieval.diffusion.ReorderedSparse` (scipy's kernel on the same
reordering) is the reference it is tested against.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
from numba import njit


@njit(cache=True, nogil=True, fastmath=True)
def _spmm_rows(indptr, indices, data, P, out, r0, r1):
    b = P.shape[1]
    acc = np.empty(b, out.dtype)
    for i in range(r0, r1):
        acc[:] = 0
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            w = data[e]
            for c in range(b):
                acc[c] += w * P[j, c]
        for c in range(b):
            out[i, c] = acc[c]


class CompiledSparse:
    """`A @ P` in reverse Cuthill-McKee order (use `permute` on right-hand sides and `unpermute`
    on solutions), rows split into `threads` blocks of equal non-zeros, each a compiled loop.
    A (n, n) sparse; P (n, b) of `dtype` (float64 or float32)."""

    def __init__(self, A: sp.spmatrix, *, dtype=np.float64, threads: int | None = None):
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        A = sp.csr_matrix(A, dtype=dtype)
        self.shape, self.dtype = A.shape, np.dtype(dtype).type
        self.perm = reverse_cuthill_mckee(A, symmetric_mode=True).astype(np.int64)
        Ap = A[self.perm][:, self.perm].tocsr()
        Ap.sort_indices()
        self.indptr, self.indices, self.data = Ap.indptr.astype(np.int64), Ap.indices.astype(np.int32), Ap.data
        n = A.shape[0]
        self.threads = max(1, threads or os.cpu_count() or 1)
        cuts = np.searchsorted(self.indptr, np.linspace(0, Ap.nnz, self.threads + 1)).clip(0, n)
        cuts[0], cuts[-1] = 0, n
        self.blocks = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        self._pool = ThreadPoolExecutor(len(self.blocks)) if len(self.blocks) > 1 else None
        self @ np.zeros((n, 1), self.dtype)  # loads the compiled code now, not in the first solve

    def permute(self, Y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(Y[self.perm])

    def unpermute(self, X: np.ndarray) -> np.ndarray:
        out = np.empty_like(X)
        out[self.perm] = X
        return out

    def __matmul__(self, P: np.ndarray) -> np.ndarray:
        P = np.asarray(P, dtype=self.dtype)
        vec = P.ndim == 1
        P = np.ascontiguousarray(P[:, None] if vec else P)
        out = np.empty((self.shape[0], P.shape[1]), dtype=self.dtype)
        run = lambda blk: _spmm_rows(self.indptr, self.indices, self.data, P, out, blk[0], blk[1])  # noqa: E731
        if self._pool is None:
            for blk in self.blocks:
                run(blk)
        else:
            list(self._pool.map(run, self.blocks))
        return out[:, 0] if vec else out
