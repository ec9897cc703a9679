"""Offline spectral ranking (Iscen et al., "Fast spectral ranking", CVPR 2018) and centrality.

With W ~ U diag(lam) U^T (r leading eigenpairs), the diffusion x = (I - alpha W)^-1 y becomes
x ~ U h(lam) U^T y with h(lam) = 1 / (1 - alpha lam): after the offline eigendecomposition, each
query is a product with an (n, r) matrix, i.e. an inner-product search over the rows of
V = U h(lam)^(1/2) with the query embedding z = h(lam)^(1/2) U^T y.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .diffusion import block_cg, diffusion_operator


@dataclass(frozen=True)
class SpectralEmbedding:
    """V (n, r) float32 database embedding, U (n, r) eigenvectors, lam (r,) eigenvalues."""

    V: np.ndarray
    U: np.ndarray
    lam: np.ndarray
    alpha: float

    def query(self, Y: np.ndarray) -> np.ndarray:
        """Query embeddings (m, r) from initial vectors Y (n, m) (dense or sparse)."""
        h = 1.0 / (1.0 - self.alpha * self.lam)
        Z = (sp.csr_matrix(Y).T @ self.U) if sp.issparse(Y) else (np.asarray(Y).T @ self.U)
        return (np.asarray(Z) * np.sqrt(h)).astype(np.float32)

    def scores(self, Y: np.ndarray) -> np.ndarray:
        """Approximate diffusion scores (m, n) = Z V^T."""
        return self.query(Y) @ self.V.T


def spectral_embedding(W: sp.spmatrix, *, rank: int, alpha: float = 0.99, seed: int = 0, tol: float = 1e-6) -> SpectralEmbedding:
    """Leading `rank` eigenpairs of the symmetric W (scipy eigsh, Lanczos) -> SpectralEmbedding.

    rank >= n - 1 falls back to a dense eigendecomposition (exact: equals the CG solution).
    """
    n = W.shape[0]
    if rank >= n - 1:
        lam, U = np.linalg.eigh(W.toarray().astype(np.float64))
    else:
        v0 = np.random.default_rng(seed).random(n)
        lam, U = spla.eigsh(sp.csr_matrix(W, dtype=np.float64), k=rank, which="LA", v0=v0, tol=tol)
    h = 1.0 / (1.0 - alpha * lam)
    V = (U * np.sqrt(h)).astype(np.float32)
    return SpectralEmbedding(V=V, U=U.astype(np.float32), lam=lam, alpha=alpha)


def katz_centrality(W: sp.spmatrix, *, alpha: float = 0.99, rtol: float = 1e-8, maxiter: int = 1000) -> np.ndarray:
    """Global centrality g solving (I - alpha W) g = 1, (n,) float64."""
    g, stats = block_cg(diffusion_operator(W, alpha), np.ones(W.shape[0]), rtol=rtol, maxiter=maxiter)
    if not stats.converged.all():
        raise RuntimeError(f"centrality: CG did not converge in {maxiter} iterations (residual {stats.residuals[0]:.2e})")
    return g
