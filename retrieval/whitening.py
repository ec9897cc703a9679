"""PCA-whitening learned on descriptors (Jegou & Chum, ECCV 2012), applied as x -> P (x - m)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Whitening:
    """Affine whitening: `mean` (d,) float64, `proj` (d_out, d) float64. Apply then L2-normalise."""

    mean: np.ndarray
    proj: np.ndarray
    kind: str = "pca"

    @property
    def dim(self) -> int:
        return int(self.proj.shape[0])

    def apply(self, X: np.ndarray) -> np.ndarray:
        """(n, d) float -> (n, d_out) float32, L2-normalised rows."""
        X = np.asarray(X, dtype=np.float64)
        if X.shape[1] != self.proj.shape[1]:
            raise ValueError(f"whitening expects d={self.proj.shape[1]}, got {X.shape[1]}")
        return l2_normalize((X - self.mean) @ self.proj.T)


def l2_normalize(X: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of (n, d) scaled to unit L2 norm, returned as float32."""
    X = np.asarray(X, dtype=np.float64)
    return (X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), eps)).astype(np.float32)


def learn_pca_whitening(X: np.ndarray, *, dim: int | None = None, shrinkage: float = 0.0) -> Whitening:
    """PCA-whitening from (n, d) training descriptors.

    P = diag(lambda + s)^-1/2 U^T restricted to the top `dim` components, where (lambda, U) are the
    eigenpairs of the covariance and s = shrinkage * mean(lambda) regularises small eigenvalues
    (shrinkage = 0 gives exact whitening: P C P^T = I on the training set).
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    mean = X.mean(axis=0)
    Xc = X - mean
    C = Xc.T @ Xc / max(n - 1, 1)
    lam, U = np.linalg.eigh(C)
    order = np.argsort(lam)[::-1]
    lam, U = lam[order], U[:, order]
    rank = int((lam > lam[0] * 1e-9).sum())
    dim = min(dim or d, rank)
    lam, U = lam[:dim], U[:, :dim]
    s = shrinkage * lam.mean()
    proj = (U / np.sqrt(lam + s)).T
    return Whitening(mean=mean, proj=proj, kind="pca")


def _inv_sqrt_psd(C: np.ndarray, shrinkage: float) -> np.ndarray:
    lam, U = np.linalg.eigh(C)
    lam = np.maximum(lam, lam.max() * 1e-9) + shrinkage * lam.mean()
    return (U / np.sqrt(lam)) @ U.T


def learn_lw_whitening(X: np.ndarray, pairs: np.ndarray, *, dim: int | None = None, shrinkage: float = 0.0) -> Whitening:
    """Learned whitening (Radenovic et al.) from matching pairs.

    Cs = covariance of pair differences x_i - x_j; P1 = Cs^-1/2 whitens them; the rotation R is the
    eigenbasis (descending) of the covariance of P1 (x - m) over the paired descriptors, so the top
    `dim` directions keep the most variance between non-matching images. proj = R^T P1.
    Args: X (n, d); pairs (p, 2) int indices of matching rows. After learning (shrinkage = 0),
    proj Cs proj^T = I.
    """
    X = np.asarray(X, dtype=np.float64)
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] < 2:
        raise ValueError(f"learned whitening needs (p >= 2, 2) pairs, got shape {pairs.shape}")
    idx = np.unique(pairs)
    mean = X[idx].mean(axis=0)
    diff = X[pairs[:, 0]] - X[pairs[:, 1]]
    Cs = diff.T @ diff / diff.shape[0]
    P1 = _inv_sqrt_psd(Cs, shrinkage)
    Z = (X[idx] - mean) @ P1.T
    Cr = Z.T @ Z / max(Z.shape[0] - 1, 1)
    lam, R = np.linalg.eigh(Cr)
    R = R[:, np.argsort(lam)[::-1]]
    dim = min(dim or X.shape[1], X.shape[1])
    proj = (R[:, :dim].T @ P1)
    return Whitening(mean=mean, proj=proj, kind="lw")


def aggregate_regions(regions: list[np.ndarray], whitening: "Whitening | None" = None) -> np.ndarray:
    """R-MAC aggregation with optional regional whitening: per image, whiten each regional vector
    ((R, C) rows), L2-normalise, sum, L2-normalise. Returns (n, d) float32."""
    out = []
    for r in regions:
        r = np.asarray(r, dtype=np.float64)
        v = whitening.apply(r) if whitening is not None else l2_normalize(r)
        out.append(v.sum(axis=0))
    return l2_normalize(np.stack(out))
