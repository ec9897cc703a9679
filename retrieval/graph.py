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
    it = np.int32 if n < 2**31 else np.int64
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


def graph_from_knn(D: np.ndarray, I: np.ndarray, *, gamma: float = 3.0, reciprocal: bool = True) -> tuple[sp.csr_matrix, GraphStats]:
    """W and its stats from self-kNN lists (D, I) of shape (n, k+1) (I int32 or int64). The
    reciprocal graph is built by compiled passes over the lists (`retrieval.graph_compiled`, O(n k)
    memory), tested equal to `affinity_from_knn` + `normalize_symmetric`, which build the other."""
    if reciprocal:
        from .graph_compiled import reciprocal_graph

        W, deg = reciprocal_graph(D, I, gamma=gamma)
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


def merge_knn(D: np.ndarray, I: np.ndarray, D2: np.ndarray, I2: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise union of two candidate lists, the `kk` most similar kept (best first).

    Args:
        D, I: (n, a) similarities and indices; D2, I2: (n, b) more candidates for the same rows
           (disjoint from the first: e.g. the same rows searched against newly added items).
        kk: entries kept per row.
    Returns: (n, kk) float32 similarities, (n, kk) int64 indices; ties keep the first list's order
    (stable sort), as a search over the concatenated database would rank the lower index first.
    """
    Dc = np.concatenate([D, D2], axis=1)
    Ic = np.concatenate([I, I2], axis=1)
    order = np.argsort(-Dc, axis=1, kind="stable")[:, :kk]
    return np.take_along_axis(Dc, order, axis=1).astype(np.float32), np.take_along_axis(Ic, order, axis=1).astype(np.int64)


def extend_knn(D_old: np.ndarray, I_old: np.ndarray, X_old: np.ndarray, X_new: np.ndarray, *, knn) -> tuple[np.ndarray, np.ndarray]:
    """Self-kNN lists of the rows of [X_old; X_new] from the lists of X_old, without searching
    old against old again: the new rows are searched against everything, the old rows only against
    the new ones, and each old list is merged with its new candidates.

    Args:
        D_old, I_old: (n_old, kk) self-kNN of X_old (as `knn(X_old, X_old, kk)` gave them).
        X_old: (n_old, d), X_new: (n_new, d) float32; new items get indices n_old .. n_old + n_new - 1.
        knn: `knn(queries, database, kk) -> (D, I)`, the search used for the old lists.
    Returns: (n_old + n_new, kk) similarities and indices; with an exact `knn` equal to searching
    the whole collection at once (up to ties). Cost: n_new x (n_old + n_new) + n_old x n_new
    distances instead of (n_old + n_new)^2.
    """
    n_old, kk = I_old.shape
    X_all = np.vstack([X_old, X_new])
    D_n, I_n = knn(X_new, X_all, kk)  # new rows against everything
    D_o, I_o = knn(X_old, X_new, min(kk, X_new.shape[0]))  # old rows against the new items only
    D_m, I_m = merge_knn(D_old, I_old, D_o, np.where(I_o >= 0, I_o + n_old, -1), kk)
    return np.vstack([D_m, D_n]).astype(np.float32), np.vstack([I_m, I_n]).astype(np.int64)
