"""A sparse operator in a locality order (reverse Cuthill-McKee unless another is given), split into
row blocks for threads: the base of the reordered block-product operators
(`retrieval.diffusion.ReorderedSparse`, `retrieval.compiled_spmm.CompiledSparse`)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .threads import Workers


def rcm_order(A: sp.spmatrix) -> np.ndarray:
    """Reverse Cuthill-McKee order (n,) int64 (position -> node) of a symmetric pattern A (n, n)."""
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    return reverse_cuthill_mckee(sp.csr_matrix(A), symmetric_mode=True).astype(np.int64)


class RowOrder:
    """A (CSR, `dtype`) in a locality order `perm` (position -> node; reverse Cuthill-McKee unless
    given, e.g. `retrieval.partition_order.partition_order`) as `self.Ap` (sorted indices), with
    `blocks`: (start, stop) row ranges of about equal non-zeros, one per thread. Works in the
    permuted space: `permute` right-hand sides, `unpermute` solutions. The base of the reordered
    operators."""

    def __init__(self, A: sp.spmatrix, *, dtype=np.float64, threads: int | None = None, perm: np.ndarray | None = None):
        A = sp.csr_matrix(A, dtype=dtype)
        self.shape, self.dtype = A.shape, dtype
        if perm is None:
            self.perm = rcm_order(A)
        else:
            self.perm = np.asarray(perm, dtype=np.int64)
            n, p = A.shape[0], self.perm
            if p.shape != (n,) or (n and (p.min() < 0 or p.max() >= n or (np.bincount(p, minlength=n) != 1).any())):
                raise ValueError(f"the row order is not a permutation of the graph's {A.shape[0]} nodes")
        self.Ap = A[self.perm][:, self.perm].tocsr()
        self.Ap.sort_indices()
        self.workers = Workers(threads)
        self.threads = self.workers.threads
        n = A.shape[0]
        cuts = np.searchsorted(self.Ap.indptr, np.linspace(0, self.Ap.nnz, self.threads + 1)).clip(0, n)
        cuts[0], cuts[-1] = 0, n
        self.blocks = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    def permute(self, Y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(Y[self.perm])

    def unpermute(self, X: np.ndarray) -> np.ndarray:
        out = np.empty_like(X)
        out[self.perm] = X
        return out

    def run_blocks(self, fn) -> None:
        """fn(k, (start, stop)) for the k-th row block, every block, in the threads."""
        self.workers.map(fn, range(len(self.blocks)), self.blocks)
