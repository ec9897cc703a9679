"""Diffusion ranking: solve (I - alpha W) x = y by conjugate gradient (Iscen et al., CVPR 2017).

Many queries are many right-hand sides: `block_cg` runs independent CG recurrences for all columns
in lockstep, so each iteration is one sparse-matrix times dense-block product, and each column
stops on its own tolerance. `scipy_cg` is the one wrapper around scipy's version-sensitive `cg`.
"""
from __future__ import annotations

import inspect
import logging

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .row_order import RowOrder
from .solve_stats import SolveStats

log = logging.getLogger(__name__)


def query_vectors(D: np.ndarray, I: np.ndarray, n: int, *, gamma: float = 3.0) -> np.ndarray:
    """Initial vectors y for diffusion from each query's top-kq database neighbours.

    Args:
        D: (nq, kq) similarities, I: (nq, kq) int64 database indices (-1 entries ignored), n: database size.
    Returns: (n, nq) float64 with y[I[q], q] = max(D[q], 0)^gamma, zero elsewhere.
    """
    return query_vectors_sparse(D, I, n, gamma=gamma).toarray()


def query_vectors_sparse(D: np.ndarray, I: np.ndarray, n: int, *, gamma: float = 3.0) -> sp.csc_matrix:
    """`query_vectors` as a sparse (n, nq) CSC matrix (nq columns of kq non-zeros), for large n."""
    nq, kq = I.shape
    ok = I >= 0
    cols = np.repeat(np.arange(nq), kq).reshape(nq, kq)[ok]
    vals = np.maximum(np.asarray(D, np.float64)[ok], 0.0) ** gamma
    return sp.csc_matrix((vals, (I[ok], cols)), shape=(n, nq))


def diffusion_operator(W: sp.spmatrix, alpha: float) -> sp.csr_matrix:
    """L = I - alpha W as CSR (n, n) float64; SPD for symmetric W with spectral radius <= 1."""
    return diffusion_operator_rows(sp.csr_matrix(W), 0, alpha)


def diffusion_operator_rows(W_rows: sp.spmatrix, row_start: int, alpha: float) -> sp.csr_matrix:
    """Rows [row_start, row_start + m) of L = I - alpha W, from the same rows of W ((m, n), global
    columns): what one distributed rank assembles. Returns (m, n) float64 CSR, sorted indices."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    m, n = W_rows.shape
    eye = sp.csr_matrix((np.ones(m), (np.arange(m), np.arange(row_start, row_start + m))), shape=(m, n))
    L = sp.csr_matrix(eye - alpha * sp.csr_matrix(W_rows, dtype=np.float64))
    L.sort_indices()
    return L


def block_cg(
    A, B: np.ndarray, *, rtol: float = 1e-6, maxiter: int = 100, dtype=np.float64
) -> tuple[np.ndarray, SolveStats]:
    """Solve A X = B column by column with CG recurrences run together.

    Args:
        A: (n, n) SPD sparse matrix, or any object whose `A @ P` multiplies an (n, m) block
           (e.g. `TorchSparse`). B: (n, m) right-hand sides.
        rtol: stop a column when ||b - A x|| <= rtol * ||b||. maxiter: iteration cap.
        dtype: float64 (reference) or float32 (half the memory traffic).
    Returns: X (n, m) of `dtype` and per-column SolveStats (non-converged columns are flagged).
    """
    B = np.asarray(B, dtype=dtype)
    squeeze = B.ndim == 1
    if squeeze:
        B = B[:, None]
    n, m = B.shape
    X = np.zeros((n, m), dtype=dtype)
    R = B.copy()
    bnorm = np.linalg.norm(B, axis=0)
    bnorm_safe = np.where(bnorm > 0, bnorm, 1.0)
    rr = np.einsum("ij,ij->j", R, R).astype(np.float64)
    P = R.copy()
    iters = np.zeros(m, dtype=np.int64)
    active = np.sqrt(rr) > rtol * bnorm_safe
    for _ in range(maxiter):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        full = idx.size == m  # all columns active: work in place, no gather/scatter copies
        Pa = P if full else P[:, idx]
        Q = np.asarray(A @ Pa, dtype=dtype)
        pq = np.einsum("ij,ij->j", Pa, Q)
        a = (rr[idx] / np.where(pq != 0, pq, 1.0)).astype(dtype)
        if full:
            X += Pa * a
            R -= Q * a
            Ra = R
        else:
            X[:, idx] += Pa * a
            R[:, idx] -= Q * a
            Ra = R[:, idx]
        rr_new = np.einsum("ij,ij->j", Ra, Ra)
        beta = (rr_new / np.where(rr[idx] != 0, rr[idx], 1.0)).astype(dtype)
        if full:
            P *= beta
            P += R
        else:
            P[:, idx] = Ra + Pa * beta
        rr[idx] = rr_new
        iters[idx] += 1
        active[idx] = np.sqrt(rr_new) > rtol * bnorm_safe[idx]
    res = np.linalg.norm((B - A @ X).astype(np.float64), axis=0) / bnorm_safe
    slack = 1.01 if dtype == np.float64 else 1.5  # float32 recurrences drift from the true residual
    stats = SolveStats(iters, res, res <= rtol * slack + 1e-12)
    return (X[:, 0] if squeeze else X), stats


class TorchSparse:
    """`A @ P` with torch's multi-threaded CSR x dense kernel (faster than scipy's per-column one)."""

    def __init__(self, A: sp.spmatrix, dtype=np.float32):
        import warnings

        import torch

        A = sp.csr_matrix(A, dtype=dtype)
        self.shape = A.shape
        self.dtype = dtype
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self._t = torch.sparse_csr_tensor(
                torch.from_numpy(A.indptr.astype(np.int64)), torch.from_numpy(A.indices.astype(np.int64)),
                torch.from_numpy(A.data), size=A.shape, check_invariants=False,
            )

    def permute(self, Y: np.ndarray) -> np.ndarray:
        return Y

    def unpermute(self, X: np.ndarray) -> np.ndarray:
        return X

    def __matmul__(self, P: np.ndarray) -> np.ndarray:
        import torch

        P = np.ascontiguousarray(P, dtype=self.dtype)
        return (self._t @ torch.from_numpy(P)).numpy()


class ReorderedSparse(RowOrder):
    """`A @ P` on a bandwidth-reducing reordering of A, row blocks multiplied in parallel threads.

    Reverse Cuthill-McKee puts graph neighbours next to each other, so the rows of P a product
    touches stay in cache (2-3x on kNN graphs here); scipy's sparse kernels release the GIL, so
    row blocks run on all cores.
    """

    def __init__(self, A: sp.spmatrix, *, dtype=np.float64, threads: int | None = None, perm: np.ndarray | None = None):
        super().__init__(A, dtype=dtype, threads=threads, perm=perm)
        self.rows = [self.Ap[a:b] for a, b in self.blocks]
        del self.Ap

    def __matmul__(self, P: np.ndarray) -> np.ndarray:
        P = np.ascontiguousarray(P, dtype=self.dtype)
        if len(self.blocks) == 1:
            return self.rows[0] @ P
        out = np.empty((self.shape[0],) + P.shape[1:], dtype=self.dtype)

        def run(k, blk):
            out[blk[0] : blk[1]] = self.rows[k] @ P

        self.run_blocks(run)
        return out


class PlainSparse:
    """`A @ P` with scipy's CSR x dense product (the reference), in the interface of the others."""

    def __init__(self, A: sp.spmatrix, *, dtype=np.float64):
        self.A = sp.csr_matrix(A, dtype=dtype)
        self.shape, self.dtype = self.A.shape, dtype

    def permute(self, Y: np.ndarray) -> np.ndarray:
        return Y

    def unpermute(self, X: np.ndarray) -> np.ndarray:
        return X

    def __matmul__(self, P: np.ndarray) -> np.ndarray:
        return self.A @ P


# sparse products for block CG, by name (`[query].matmul`)
MATMULS = ("reordered", "scipy", "torch", "compiled")


def sparse_operator(A: sp.spmatrix, matmul: str = "reordered", *, dtype=np.float64, perm: np.ndarray | None = None):
    """`A @ P` operator by name (see MATMULS), with `permute(Y)` / `unpermute(X)` between the
    caller's node order and the operator's (identity for "scipy" and "torch"). The reordering ones
    ("reordered", "compiled") work in row order `perm` (n,) (position -> node), RCM when None."""
    if matmul == "reordered":
        return ReorderedSparse(A, dtype=dtype, perm=perm)
    if matmul == "scipy":
        return PlainSparse(A, dtype=dtype)
    if matmul == "torch":
        return TorchSparse(A, dtype=dtype)
    if matmul == "compiled":
        from .compiled_spmm import CompiledSparse

        return CompiledSparse(A, dtype=dtype, perm=perm)
    raise ValueError(f"unknown matmul {matmul!r}; expected one of {MATMULS}")


def topk_columns(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column of X (n, m): indices (m, k) of the k largest values, descending, and the values."""
    k = min(k, X.shape[0])
    part = np.argpartition(-X, k - 1, axis=0)[:k].T
    vals = np.take_along_axis(X.T, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(vals, order, 1)


_CG_TOL_KW = "rtol" if "rtol" in inspect.signature(spla.cg).parameters else "tol"


def scipy_cg(A: sp.spmatrix, b: np.ndarray, *, rtol: float = 1e-6, maxiter: int = 100) -> tuple[np.ndarray, int]:
    """One right-hand side with scipy's `cg` (keyword `rtol`, or `tol` on old scipy).

    Returns: x (n,) float64 and scipy's info (0 = converged).
    """
    x, info = spla.cg(A, np.asarray(b, dtype=np.float64), **{_CG_TOL_KW: rtol}, maxiter=maxiter, atol=0.0)
    return x, int(info)


def diffusion_scores(
    W: sp.spmatrix,
    D: np.ndarray,
    I: np.ndarray,
    *,
    alpha: float = 0.99,
    gamma: float = 3.0,
    rtol: float = 1e-6,
    maxiter: int = 100,
) -> tuple[np.ndarray, SolveStats]:
    """Diffusion scores for a batch of queries given their kNN (D, I) in the database.

    Returns: (nq, n) float64 scores x (higher = more relevant) and the solver stats.
    """
    Y = query_vectors(D, I, W.shape[0], gamma=gamma)
    X, stats = block_cg(diffusion_operator(W, alpha), Y, rtol=rtol, maxiter=maxiter)
    nbad = int((~stats.converged).sum())
    if nbad:
        log.warning("diffusion: %d of %d queries did not converge in %d iterations", nbad, Y.shape[1], maxiter)
    return X.T, stats


def rank_by_scores(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Rank database items per query by `primary` descending, ties by `secondary` descending.

    Diffusion leaves items outside the query's connected component at score 0; they are then
    ordered by their plain similarity instead of arbitrarily.
    Args: primary, secondary: (nq, n). Returns: (nq, n) int64 indices, best first.
    """
    out = np.empty(primary.shape, dtype=np.int64)
    for q in range(primary.shape[0]):
        out[q] = np.lexsort((-secondary[q], -primary[q]))
    return out
