"""Near-duplicate groups in a set of descriptors: every pair above a similarity (faiss range search),
joined transitively (connected components) or as sets around a centre (leader clustering).

Transitive groups chain: in a dense cloud a path of near-duplicate pairs can link descriptors that are
not alike at all, so a large transitive group is not by itself a family of copies. A centred set
is: each of its members is a near-duplicate of the same centre.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .knn import range_pairs

RANGE_BLOCK = 1 << 14  # query rows per range search (bounds faiss's per-call result buffers)


def similar_pairs(X: np.ndarray, threshold: float) -> sp.csr_matrix:
    """Every pair (i, j), i != j, of rows of X ((n, d) float32, L2-normalised) with inner product
    above `threshold`, by exact range search (`retrieval.knn.range_pairs`). Returns a symmetric
    (n, n) boolean CSR matrix."""
    n = len(X)
    r, c = range_pairs(X, threshold, block=RANGE_BLOCK)
    A = sp.csr_matrix((np.ones(len(r), bool), (r, c)), shape=(n, n))
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
    x = np.asarray(X[rows], np.float32)
    S = (x @ x.T)[np.triu_indices(len(rows), 1)]
    return {"min": float(S.min()), "median": float(np.median(S)), "share_above": float((S > threshold).mean())}
