"""Near-duplicate groups in a set of descriptors: every pair above a similarity (faiss range search),
joined transitively (connected components) or as sets around a centre (leader clustering).

Transitive groups chain: in a dense cloud a path of near-duplicate pairs can link descriptors that are
not alike at all, so a large transitive group is not by itself a family of copies. A centred set
is: each of its members is a near-duplicate of the same centre.
"""
from __future__ import annotations

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .knn import _as_f32

RANGE_BLOCK = 1 << 14  # query rows per range search (bounds faiss's per-call result buffers)


def similar_pairs(X: np.ndarray, threshold: float) -> sp.csr_matrix:
    """Every pair (i, j), i != j, of rows of X ((n, d) float32, L2-normalised) with inner product
    above `threshold`, by exact range search (faiss flat index). Returns a symmetric (n, n) boolean
    CSR matrix."""
    x = _as_f32(X, "descriptors")
    n = x.shape[0]
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    rows, cols = [], []
    for a in range(0, n, RANGE_BLOCK):
        lims, _, ids = index.range_search(x[a : a + RANGE_BLOCK], float(threshold))
        lims = lims.astype(np.int64)  # faiss gives size_t offsets
        rows.append(np.repeat(np.arange(a, a + len(lims) - 1), np.diff(lims)))
        cols.append(ids)
    r, c = np.concatenate(rows or [np.empty(0, np.int64)]), np.concatenate(cols or [np.empty(0, np.int64)])
    keep = r != c
    A = sp.csr_matrix((np.ones(int(keep.sum()), bool), (r[keep], c[keep])), shape=(n, n))
    return (A + A.T).astype(bool).tocsr()  # symmetric even where rounding put a pair on one side of the threshold only


def linked_groups(A: sp.csr_matrix) -> np.ndarray:
    """Group label (n,) int per row: the connected components of the pairs in A (transitive)."""
    return connected_components(A, directed=False)[1]


def centred_groups(A: sp.csr_matrix) -> np.ndarray:
    """Group label (n,) int per row by leader clustering of the pairs in A (symmetric (n, n)): rows
    taken in order of how many pairs they have (most first, ties by lower row); a row not yet in a
    group starts one as its centre and takes every row paired with it that is not yet in a group.
    Every member of a group is paired with its centre; a row with no pairs is a group of its own."""
    n = A.shape[0]
    deg = np.diff(A.indptr)
    label = np.full(n, -1, np.int64)
    nxt = 0
    for r in np.lexsort((np.arange(n), -deg)):
        if deg[r] == 0:
            break
        if label[r] >= 0:
            continue
        members = A.indices[A.indptr[r] : A.indptr[r + 1]]
        members = members[label[members] < 0]
        label[r] = label[members] = nxt
        nxt += 1
    alone = label < 0
    label[alone] = nxt + np.arange(int(alone.sum()))
    return label


def group_summary(labels: np.ndarray) -> dict:
    """{groups (of more than one), largest, in_groups (share of rows in such groups), distinct (groups,
    singletons included)} of a labelling."""
    sizes = np.bincount(labels) if len(labels) else np.zeros(1, np.int64)
    multi = sizes[sizes > 1]
    return {"groups": int(len(multi)), "largest": int(sizes.max()), "in_groups": float(multi.sum() / max(len(labels), 1)),
            "distinct": int((sizes > 0).sum())}


def pairwise_spread(X: np.ndarray, rows: np.ndarray, threshold: float, *, sample: int = 2000, seed: int = 0) -> dict:
    """How alike the members of one group are: the least and median inner product between its rows
    of X (at most `sample` of them, drawn with `seed`) and the share of those pairs above `threshold`."""
    rows = np.asarray(rows)
    if len(rows) > sample:
        rows = np.sort(np.random.default_rng(seed).choice(rows, sample, replace=False))
    if len(rows) < 2:
        return {}
    x = _as_f32(X[rows], "descriptors")
    S = (x @ x.T)[np.triu_indices(len(rows), 1)]
    return {"min": float(S.min()), "median": float(np.median(S)), "share_above": float((S > threshold).mean())}
