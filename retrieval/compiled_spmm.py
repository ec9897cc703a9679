"""Sparse x dense block product `A @ P` as a compiled kernel, for block CG on large graphs.

One loop per row block, run in a thread per core (the kernel releases the GIL): for each row, each
non-zero's row of P (b contiguous values) is scaled and added into the output row, which stays in
registers/L1 while the row is summed; numba vectorises the loop over the b columns. The graph is in
reverse Cuthill-McKee order (the rows a block gathers are near each other, so they are reused from
cache) with 32-bit column ids. `retrieval.diffusion.ReorderedSparse` (scipy's kernel on the same
reordering) is the reference it is tested against.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit

from .rcm import RcmOrder


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


class CompiledSparse(RcmOrder):
    """`A @ P` in reverse Cuthill-McKee order (`permute` right-hand sides, `unpermute` solutions),
    rows split into a block of equal non-zeros per thread, each a compiled loop.
    A (n, n) sparse; P (n, b) or (n,) of `dtype` (float64 or float32)."""

    def __init__(self, A: sp.spmatrix, *, dtype=np.float64, threads: int | None = None):
        super().__init__(A, dtype=dtype, threads=threads)
        self.dtype = np.dtype(dtype).type
        self.indptr, self.indices, self.data = self.Ap.indptr.astype(np.int64), self.Ap.indices.astype(np.int32), self.Ap.data
        del self.Ap
        self @ np.zeros((self.shape[0], 1), self.dtype)  # loads the compiled code now, not in the first solve

    def __matmul__(self, P: np.ndarray) -> np.ndarray:
        P = np.asarray(P, dtype=self.dtype)
        vec = P.ndim == 1
        P = np.ascontiguousarray(P[:, None] if vec else P)
        out = np.empty((self.shape[0], P.shape[1]), dtype=self.dtype)
        self.run_blocks(lambda blk: _spmm_rows(self.indptr, self.indices, self.data, P, out, blk[0], blk[1]))
        return out[:, 0] if vec else out
