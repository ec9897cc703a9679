"""A cache-friendly row order for sparse products over a large graph, from a METIS partition.

Reverse Cuthill-McKee keeps a band narrow, which serves a graph with a long thin shape; a kNN graph of
crossing manifolds has wide fronts instead, and at 10^6 nodes most non-zeros of an RCM-ordered row
gather a row of P that is far away (and out of cache). METIS cuts the graph into parts of about
`rows_per_part` nodes with few edges between them: in part order most of a row's non-zeros fall
inside its own part, whose rows of P were just used. Parts are placed in reverse Cuthill-McKee order
of the graph between them (neighbouring parts next to each other), and rows inside a part in their
RCM order. The one METIS call (pymetis) lives here.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .row_order import rcm_order

ROWS_PER_PART = 1024  # measured at 10^6 (BENCHMARKS.md): parts of ~10^3 rows beat 10^2-10^4


def metis_parts(A: sp.spmatrix, parts: int, *, seed: int = 0) -> np.ndarray:
    """METIS k-way partition of the symmetric pattern of A (n, n), diagonal ignored: (n,) int64 part
    of each node in [0, parts). Deterministic for a seed."""
    import pymetis

    G = sp.csr_matrix(A) != 0
    G = (G + G.T).tocsr()  # the pattern, both directions of every edge (METIS needs them)
    G.setdiag(False)
    G.eliminate_zeros()
    adj = pymetis.CSRAdjacency(G.indptr.astype(np.int32), G.indices.astype(np.int32))
    _, membership = pymetis.part_graph(parts, adj, options=pymetis.Options(seed=seed))
    return np.asarray(membership, dtype=np.int64)


def partition_order(A: sp.spmatrix, *, rows_per_part: int | None = None, seed: int = 0) -> np.ndarray:
    """Row order (n,) int64 (a permutation: position -> node) of A (n, n) for cache reuse in A @ P:
    METIS parts of ~`rows_per_part` nodes, parts in RCM order of the part graph, nodes of a part in
    the whole graph's RCM order (`rows_per_part` None: ROWS_PER_PART). A graph of under two parts'
    nodes gets plain RCM."""
    A = sp.csr_matrix(A)
    n = A.shape[0]
    rcm = rcm_order(A)
    nparts = n // max(1, rows_per_part or ROWS_PER_PART)
    if nparts < 2 or A.nnz == 0:
        return rcm
    part = metis_parts(A, nparts, seed=seed)
    C = sp.csr_matrix((np.ones(n), (np.arange(n), part)), shape=(n, nparts))
    between = (C.T @ (A != 0).astype(np.float64) @ C).tocsr()
    part_rank = np.empty(nparts, np.int64)
    part_rank[rcm_order(between)] = np.arange(nparts)
    rcm_pos = np.empty(n, np.int64)
    rcm_pos[rcm] = np.arange(n)
    return np.lexsort((rcm_pos, part_rank[part])).astype(np.int64)


ORDERS: tuple[str, ...] = ("partition", "rcm")


def row_order(A: sp.spmatrix, order: str = "rcm") -> np.ndarray:
    """The row order (n,) int64 named `order` ("rcm" or "partition") of A (n, n)."""
    if order == "rcm":
        return rcm_order(A)
    if order == "partition":
        return partition_order(A)
    raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
