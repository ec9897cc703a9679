"""Reciprocal kNN affinity graph with symmetric normalisation (Iscen et al., CVPR 2017).

a_ij = max(s_ij, 0)^gamma kept only when i and j are in each other's k lists, zero diagonal,
W = D^-1/2 A D^-1/2 with isolated nodes (degree 0) left as empty rows instead of divided by zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .ids import ids_dtype


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

    Vectorised over all edges (no per-row loops); memory O(n k).
    Args:
        D: (n, k) float32 similarities, I: (n, k) int64 neighbour indices (row i = neighbours of i;
           self matches and -1 padding are dropped).
        gamma: power applied to positive similarities.
        reciprocal: keep an edge only if both endpoints list each other (mutual kNN); otherwise
           symmetrise by the maximum.
    Returns: (n, n) float32 CSR, exactly symmetric, zero diagonal.
    """
    n = D.shape[0] if n is None else n
    k = D.shape[1]
    # 32-bit indices while they fit, and every temporary dropped as soon as it is used: at 10^5 x 51
    # this step was the graph stage's peak (+435 MB), now about half of that
    it = ids_dtype(n)
    rows = np.repeat(np.arange(D.shape[0], dtype=it), k)
    cols = I.reshape(-1).astype(it)
    vals = np.maximum(D.reshape(-1).astype(np.float32, copy=False), 0.0) ** np.float32(gamma)
    keep = (cols >= 0) & (cols != rows) & (vals > 0)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    del keep
    if reciprocal:
        # a pair is mutual when its canonical key (min, max) occurs for both directions: one sort of
        # the edge keys finds them with sequential memory access (a binary search per edge was 15x slower)
        ckey = np.minimum(rows, cols).astype(np.int64) * n + np.maximum(rows, cols)
        order = np.argsort(ckey, kind="stable")
        sk = ckey[order]
        del ckey
        twice = np.flatnonzero(sk[1:] == sk[:-1])
        keys, first = np.unique(sk[twice], return_index=True)  # guard against repeated neighbours
        del sk
        v = vals[order[twice[first]]]
        del order, twice, first, rows, cols, vals
        r, c = (keys // n).astype(it), (keys % n).astype(it)
        del keys
        # keep one value per pair and mirror it: exact symmetry
        A = sp.csr_matrix((np.concatenate([v, v]), (np.concatenate([r, c]), np.concatenate([c, r]))), shape=(n, n))
    else:
        S = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
        A = S.maximum(S.T)
    A = sp.csr_matrix(A, dtype=np.float32)
    A.sum_duplicates()
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
    W = A.copy()
    rows = np.repeat(np.arange(A.shape[0]), np.diff(A.indptr))
    W.data = (A.data * inv[rows] * inv[A.indices]).astype(np.float32)
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

    `knn(X, k) -> (D, I)` (self search) defaults to exact faiss search; k excludes the item itself.
    """
    if knn is None:
        from .knn import knn_search

        knn = lambda x, kk: knn_search(x, x, kk)  # noqa: E731
    D, I = knn(X, k + 1)
    return graph_from_knn(D, I, gamma=gamma, reciprocal=reciprocal)


def graph_from_knn(D: np.ndarray, I: np.ndarray, *, gamma: float = 3.0, reciprocal: bool = True,
                   overwrite: bool = False) -> tuple[sp.csr_matrix, GraphStats]:
    """W and its stats from self-kNN lists (D, I) of shape (n, k+1) (I int32 or int64). The
    reciprocal graph is built by compiled passes over the lists (`retrieval.graph_compiled`, O(n k)
    memory; in the lists' own arrays with `overwrite`, which leaves them sorted by id and D holding
    weights), tested equal to `affinity_from_knn` + `normalize_symmetric`, which build the other."""
    if reciprocal:
        from .graph_compiled import reciprocal_graph

        W, deg = reciprocal_graph(D, I, gamma=gamma, overwrite=overwrite)
    else:
        W, deg = normalize_symmetric(affinity_from_knn(D, I, gamma=gamma, reciprocal=False, n=D.shape[0]))
    return W, graph_stats(W, deg)


def mutual_nn_pairs(I: np.ndarray, *, rank: int = 1) -> np.ndarray:
    """Pairs (i, j), i < j, that are each other's nearest neighbour (excluding themselves).

    Args: I (n, k) self-kNN ids, column 0 being the item itself; rank: use the neighbour at this
    column. Mined without labels, such pairs are the matching pairs of learned whitening.
    Returns: (p, 2) int64.
    """
    n = I.shape[0]
    nn = I[:, rank].astype(np.int64)
    i = np.arange(n)
    ok = (nn >= 0) & (nn != i)
    mutual = ok & (nn[np.clip(nn, 0, n - 1)] == i) & (i < nn)
    return np.stack([i[mutual], nn[mutual]], axis=1)
