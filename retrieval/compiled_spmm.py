"""Sparse x dense block product `A @ P` as a compiled kernel, for block CG on large graphs.

One loop per row block, run in a thread per core (the kernel releases the GIL): for each row, each
non-zero's row of P (b contiguous values) is scaled and added into the output row, which stays in
registers/L1 while the row is summed; numba vectorises the loop over the b columns. Narrow blocks
(one query's solve, or the few concurrent queries a service batches) have kernels of their own with
scalar accumulators: one column (`_spmm_cols`), 2 to NARROW_B columns (`_spmm_narrow`, the matrix read
once for all of them). The graph is in a locality order (METIS
parts or reverse Cuthill-McKee, `retrieval.partition_order`: the rows a block gathers are near each
other, so they are reused from cache) with 32-bit column ids. `retrieval.diffusion.ReorderedSparse`
(scipy's kernel on the same reordering) is the reference it is tested against. Block CG's vector
updates run as compiled passes over the same row blocks (`block_cg_fused`).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit

from .row_order import RowOrder
from .solve_stats import SolveStats


@njit(cache=True, nogil=True, fastmath=True)
def _spmm_rows(indptr, indices, data, P, out, r0, r1, pq):
    """out[r0:r1] = (A @ P)[r0:r1], each output row accumulated in registers/L1 while each non-zero's
    row of P is added; and (pq not None) pq[c] = sum over the rows of P[i, c] * out[i, c] (block
    CG's p.q) in the same pass, while row i of P and of the output are at hand."""
    b = P.shape[1]
    acc = np.empty(b, out.dtype)
    if pq is not None:
        for c in range(b):
            pq[c] = 0.0
    for i in range(r0, r1):
        acc[:] = 0
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            w = data[e]
            for c in range(b):
                acc[c] += w * P[j, c]
        for c in range(b):
            out[i, c] = acc[c]
        if pq is not None:
            for c in range(b):
                pq[c] += P[i, c] * acc[c]


@njit(cache=True, nogil=True, fastmath=True)
def _spmm_cols(indptr, indices, data, P, out, r0, r1, pq):
    """_spmm_rows for one column (one query's solve) with a scalar accumulator: 3.4x faster than the
    row kernel, whose per-non-zero loop over b columns costs the same from 1 to 8 columns."""
    s = 0.0
    for i in range(r0, r1):
        acc = 0.0
        for e in range(indptr[i], indptr[i + 1]):
            acc += data[e] * P[indices[e], 0]
        out[i, 0] = acc
        s += P[i, 0] * acc
    if pq is not None:
        pq[0] = s


@njit(cache=True, nogil=True, fastmath=True)
def _spmm_narrow(indptr, indices, data, P, out, r0, r1, pq):
    """_spmm_rows for 2 to 4 columns, one scalar accumulator per column: the matrix is read once
    for all of them, and each non-zero's values of P share a cache line (2-4 columns cost 1.1-1.4x
    one column, against 2-4x column by column and 2.2-2.5x in the row kernel, BENCHMARKS.md)."""
    b = P.shape[1]
    s0 = s1 = s2 = s3 = 0.0
    for i in range(r0, r1):
        a0 = a1 = a2 = a3 = 0.0
        if b == 2:
            for e in range(indptr[i], indptr[i + 1]):
                j, w = indices[e], data[e]
                a0 += w * P[j, 0]
                a1 += w * P[j, 1]
        elif b == 3:
            for e in range(indptr[i], indptr[i + 1]):
                j, w = indices[e], data[e]
                a0 += w * P[j, 0]
                a1 += w * P[j, 1]
                a2 += w * P[j, 2]
        else:
            for e in range(indptr[i], indptr[i + 1]):
                j, w = indices[e], data[e]
                a0 += w * P[j, 0]
                a1 += w * P[j, 1]
                a2 += w * P[j, 2]
                a3 += w * P[j, 3]
        out[i, 0], out[i, 1] = a0, a1
        s0 += P[i, 0] * a0
        s1 += P[i, 1] * a1
        if b > 2:
            out[i, 2] = a2
            s2 += P[i, 2] * a2
        if b > 3:
            out[i, 3] = a3
            s3 += P[i, 3] * a3
    if pq is not None:
        pq[0], pq[1] = s0, s1
        if b > 2:
            pq[2] = s2
        if b > 3:
            pq[3] = s3


NARROW_B = 4  # up to this many columns the product has a kernel of its own (BENCHMARKS.md)


def _kernel(b: int):
    """The product's kernel for a block of b columns."""
    return _spmm_cols if b == 1 else _spmm_narrow if b <= NARROW_B else _spmm_rows


class CompiledSparse(RowOrder):
    """`A @ P` in a locality order (reverse Cuthill-McKee unless `perm` is given; `permute`
    right-hand sides, `unpermute` solutions), rows split into a block of equal non-zeros per
    thread, each a compiled loop. A (n, n) sparse; P (n, b) or (n,) of `dtype` (float64 or float32)."""

    def __init__(self, A: sp.spmatrix, *, dtype=np.float64, threads: int | None = None, perm: np.ndarray | None = None):
        super().__init__(A, dtype=dtype, threads=threads, perm=perm)
        self.dtype = np.dtype(dtype).type
        self.indptr, self.indices, self.data = self.Ap.indptr.astype(np.int64), self.Ap.indices.astype(np.int32), self.Ap.data
        del self.Ap
        self @ np.zeros((self.shape[0], 1), self.dtype)  # loads the compiled code now, not in the first solve

    def __matmul__(self, P: np.ndarray) -> np.ndarray:
        P = np.asarray(P, dtype=self.dtype)
        vec = P.ndim == 1
        P = np.ascontiguousarray(P[:, None] if vec else P)
        out = np.empty((self.shape[0], P.shape[1]), dtype=self.dtype)
        kernel = _kernel(P.shape[1])
        self.run_blocks(lambda k, blk: kernel(self.indptr, self.indices, self.data, P, out, blk[0], blk[1], None))
        return out[:, 0] if vec else out

    def matmul_dots(self, P: np.ndarray, part: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = A @ P for contiguous P, out (n, b) of this dtype, with part[k] (b,) float64 = the
        k-th row block's column sums of P * out (block CG's p.q, summed by the caller), in one pass."""
        kernel = _kernel(P.shape[1])
        self.run_blocks(lambda k, blk: kernel(self.indptr, self.indices, self.data, P, out, blk[0], blk[1], part[k]))
        return out

    def cg(self, B: np.ndarray, *, rtol: float = 1e-6, maxiter: int = 100):
        """Block CG on this operator with fused vector updates (`block_cg_fused`)."""
        return block_cg_fused(self, B, rtol=rtol, maxiter=maxiter)


@njit(cache=True, nogil=True, fastmath=True)
def _step(X, R, P, Q, a, r0, r1, rr):
    """X += a P, R -= a Q over rows r0:r1 (per column a); rr[c] = that block's sum of R[:, c]^2."""
    b = P.shape[1]
    for c in range(b):
        rr[c] = 0.0
    for i in range(r0, r1):
        for c in range(b):
            X[i, c] += a[c] * P[i, c]
            r = R[i, c] - a[c] * Q[i, c]
            R[i, c] = r
            rr[c] += r * r


@njit(cache=True, nogil=True, fastmath=True)
def _direction(P, R, beta, r0, r1):
    """P = R + beta P over rows r0:r1."""
    b = P.shape[1]
    for i in range(r0, r1):
        for c in range(b):
            P[i, c] = R[i, c] + beta[c] * P[i, c]


@njit(cache=True, nogil=True, fastmath=True)
def _residual_sq(B, Q, r0, r1, out):
    """out[c] = sum over rows r0:r1 of (B[i, c] - Q[i, c])^2, in float64 (Q None: of B[i, c]^2)."""
    b = B.shape[1]
    for c in range(b):
        out[c] = 0.0
    for i in range(r0, r1):
        for c in range(b):
            d = np.float64(B[i, c]) if Q is None else np.float64(B[i, c]) - np.float64(Q[i, c])
            out[c] += d * d


def block_cg_fused(op: CompiledSparse, B: np.ndarray, *, rtol: float = 1e-6, maxiter: int = 100):
    """`retrieval.diffusion.block_cg` on a CompiledSparse operator, in op's dtype, with the vector
    updates of each iteration fused into the product (p.q) and two compiled passes over the row
    blocks (the numpy recurrences make five with temporaries, and cost more than the product). Converged columns
    keep their values (step 0) but stay in the product. B (n, m) in op's (permuted) order.
    Returns X (n, m) and SolveStats, as block_cg."""
    dt = op.dtype
    B = np.ascontiguousarray(B, dtype=dt)
    squeeze = B.ndim == 1
    if squeeze:
        B = B[:, None]
    n, m = B.shape
    nb = len(op.blocks)
    X, R, P, Q = np.zeros((n, m), dt), B.copy(), B.copy(), np.empty((n, m), dt)
    part = np.zeros((nb, m), np.float64)  # per-block sums in float64: a float32 sum over 10^5+ rows drifts
    op.run_blocks(lambda k, blk: _residual_sq(B, None, blk[0], blk[1], part[k]))
    rr = part.sum(axis=0, dtype=np.float64)  # ||b||^2 per column, one pass without temporaries
    bnorm = np.sqrt(rr)
    bnorm_safe = np.where(bnorm > 0, bnorm, 1.0)
    active = np.sqrt(rr) > rtol * bnorm_safe
    iters = np.zeros(m, np.int64)
    for _ in range(maxiter):
        if not active.any():
            break
        op.matmul_dots(P, part, Q)
        pq = part.sum(axis=0, dtype=np.float64)
        a = np.where(active & (pq != 0), rr / np.where(pq != 0, pq, 1.0), 0.0).astype(dt)
        op.run_blocks(lambda k, blk: _step(X, R, P, Q, a, blk[0], blk[1], part[k]))
        rr_new = part.sum(axis=0, dtype=np.float64)
        beta = np.where(active, rr_new / np.where(rr != 0, rr, 1.0), 0.0).astype(dt)
        op.run_blocks(lambda k, blk: _direction(P, R, beta, blk[0], blk[1]))
        iters += active
        rr = np.where(active, rr_new, rr)
        active &= np.sqrt(rr) > rtol * bnorm_safe
    op.matmul_dots(X, part, Q)  # the true residual B - A X, without (n, m) temporaries
    op.run_blocks(lambda k, blk: _residual_sq(B, Q, blk[0], blk[1], part[k]))
    res = np.sqrt(part.sum(axis=0, dtype=np.float64)) / bnorm_safe
    slack = 1.01 if dt == np.float64 else 1.5  # as block_cg: float32 recurrences drift from the true residual
    stats = SolveStats(iters, res, res <= rtol * slack + 1e-12)
    return (X[:, 0] if squeeze else X), stats
