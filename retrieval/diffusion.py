"""Diffusion ranking: solve (I - alpha W) x = y by conjugate gradient (Iscen et al., CVPR 2017).

Many queries are many right-hand sides: `block_cg` runs independent CG recurrences for all columns
in lockstep, so each iteration is one sparse-matrix times dense-block product, and each column
stops on its own tolerance. `scipy_cg` is the one wrapper around scipy's version-sensitive `cg`.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveStats:
    """Per right-hand side: iterations run, final relative residual ||b - Ax|| / ||b||, converged."""

    iterations: np.ndarray  # (m,) int64
    residuals: np.ndarray  # (m,) float64
    converged: np.ndarray  # (m,) bool


def query_vectors(D: np.ndarray, I: np.ndarray, n: int, *, gamma: float = 3.0) -> np.ndarray:
    """Initial vectors y for diffusion from each query's top-kq database neighbours.

    Args:
        D: (nq, kq) similarities, I: (nq, kq) int64 database indices, n: database size.
    Returns: (n, nq) float64 with y[I[q], q] = max(D[q], 0)^gamma, zero elsewhere.
    """
    nq, kq = I.shape
    Y = np.zeros((n, nq), dtype=np.float64)
    cols = np.repeat(np.arange(nq), kq)
    Y[I.ravel(), cols] = np.maximum(D.ravel().astype(np.float64), 0.0) ** gamma
    return Y


def diffusion_operator(W: sp.spmatrix, alpha: float) -> sp.csr_matrix:
    """L = I - alpha W as CSR (n, n) float64; SPD for symmetric W with spectral radius <= 1."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = W.shape[0]
    return sp.csr_matrix(sp.identity(n, format="csr") - alpha * sp.csr_matrix(W, dtype=np.float64))


def block_cg(
    A: sp.spmatrix, B: np.ndarray, *, rtol: float = 1e-6, maxiter: int = 100
) -> tuple[np.ndarray, SolveStats]:
    """Solve A X = B column by column with CG recurrences run together.

    Args:
        A: (n, n) SPD sparse matrix. B: (n, m) right-hand sides.
        rtol: stop a column when ||b - A x|| <= rtol * ||b||. maxiter: iteration cap.
    Returns: X (n, m) float64 and per-column SolveStats (non-converged columns are flagged).
    """
    B = np.asarray(B, dtype=np.float64)
    squeeze = B.ndim == 1
    if squeeze:
        B = B[:, None]
    n, m = B.shape
    X = np.zeros((n, m))
    R = B.copy()
    bnorm = np.linalg.norm(B, axis=0)
    bnorm_safe = np.where(bnorm > 0, bnorm, 1.0)
    rr = np.einsum("ij,ij->j", R, R)
    P = R.copy()
    iters = np.zeros(m, dtype=np.int64)
    active = np.sqrt(rr) > rtol * bnorm_safe
    for _ in range(maxiter):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        Pa = P[:, idx]
        Q = A @ Pa
        pq = np.einsum("ij,ij->j", Pa, Q)
        a = rr[idx] / np.where(pq != 0, pq, 1.0)
        X[:, idx] += Pa * a
        R[:, idx] -= Q * a
        rr_new = np.einsum("ij,ij->j", R[:, idx], R[:, idx])
        beta = rr_new / np.where(rr[idx] != 0, rr[idx], 1.0)
        P[:, idx] = R[:, idx] + Pa * beta
        rr[idx] = rr_new
        iters[idx] += 1
        active[idx] = np.sqrt(rr_new) > rtol * bnorm_safe[idx]
    res = np.linalg.norm(B - A @ X, axis=0) / bnorm_safe
    stats = SolveStats(iters, res, res <= rtol * 1.01 + 1e-12)
    return (X[:, 0] if squeeze else X), stats


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
