"""Reciprocal kNN affinity graph with symmetric normalisation (Iscen et al., CVPR 2017).

a_ij = max(s_ij, 0)^gamma kept only when i and j are in each other's k lists, zero diagonal,
W = D^-1/2 A D^-1/2 with isolated nodes (degree 0) left as empty rows instead of divided by zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class GraphStats:
    n: int
    nnz: int
    isolated: int
    degree_min: float
    degree_mean: float
    degree_max: float


def affinity_from_knn(
    D: np.ndarray, I: np.ndarray, *, gamma: float = 3.0, reciprocal: bool = True, n: int | None = None
) -> sp.csr_matrix:
    """Sparse symmetric affinity A from kNN lists of every database item against the database.

    Args:
        D: (n, k) float32 similarities, I: (n, k) int64 neighbour indices (row i = neighbours of i;
           self matches are dropped here).
        gamma: power applied to positive similarities.
        reciprocal: keep an edge only if both endpoints list each other (mutual kNN); otherwise
           symmetrise by the maximum.
    Returns: (n, n) float32 CSR, symmetric, zero diagonal.
    """
    n = D.shape[0] if n is None else n
    k = D.shape[1]
    rows = np.repeat(np.arange(D.shape[0], dtype=np.int64), k)
    cols = I.ravel().astype(np.int64)
    vals = np.maximum(D.ravel().astype(np.float64), 0.0) ** gamma
    keep = (cols >= 0) & (cols != rows) & (vals > 0)
    S = sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(n, n))
    S.sum_duplicates()
    if reciprocal:
        # S.multiply(S.T > 0) keeps (i, j) only when (j, i) is stored too.
        mask = S.T.tocsr()
        mask.data[:] = 1.0
        A = S.multiply(mask)
    else:
        A = S.maximum(S.T)
    A = sp.csr_matrix(A, dtype=np.float32)
    A.eliminate_zeros()
    return A


def normalize_symmetric(A: sp.spmatrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """W = D^-1/2 A D^-1/2; rows/cols of isolated nodes stay zero.

    Returns: (W (n, n) float32 CSR, degrees (n,) float64).
    """
    A = sp.csr_matrix(A)
    deg = np.asarray(A.sum(axis=1)).ravel().astype(np.float64)
    inv = np.zeros_like(deg)
    nz = deg > 0
    inv[nz] = 1.0 / np.sqrt(deg[nz])
    Dm = sp.diags(inv)
    W = sp.csr_matrix(Dm @ A @ Dm, dtype=np.float32)
    W.sort_indices()
    return W, deg


def graph_stats(W: sp.csr_matrix, deg: np.ndarray) -> GraphStats:
    return GraphStats(
        n=int(W.shape[0]),
        nnz=int(W.nnz),
        isolated=int((deg == 0).sum()),
        degree_min=float(deg.min()) if deg.size else 0.0,
        degree_mean=float(deg.mean()) if deg.size else 0.0,
        degree_max=float(deg.max()) if deg.size else 0.0,
    )


def build_graph(
    X: np.ndarray, *, k: int = 50, gamma: float = 3.0, reciprocal: bool = True, knn=None
) -> tuple[sp.csr_matrix, GraphStats]:
    """Normalised reciprocal kNN graph of the rows of X ((n, d) float32, L2-normalised).

    `knn(queries, database, k) -> (D, I)` defaults to exact faiss search. k counts the item itself.
    """
    if knn is None:
        from .knn import knn_search as knn
    D, I = knn(X, X, k + 1)
    A = affinity_from_knn(D, I, gamma=gamma, reciprocal=reciprocal, n=X.shape[0])
    W, deg = normalize_symmetric(A)
    return W, graph_stats(W, deg)
