"""The METIS partition row order: a permutation that keeps each well-separated cluster of a kNN
graph in one contiguous run of rows, and puts more of a graph's non-zeros near the diagonal than RCM
on crossing clusters."""
import numpy as np
import pytest

from retrieval.graph import build_graph
from retrieval.partition_order import partition_order, row_order
from retrieval.whitening import l2_normalize


def _clusters(n_clusters: int, size: int, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    C = rng.normal(size=(n_clusters, 16))
    lab = np.repeat(np.arange(n_clusters), size)
    X = C[lab] + spread * rng.normal(size=(n_clusters * size, 16))
    shuffle = rng.permutation(len(X))
    return l2_normalize(X[shuffle]).astype(np.float32), lab[shuffle]


def test_separated_clusters_come_out_contiguous():
    """Each run of 250 rows is one cluster (the reciprocal graph leaves some nodes without edges,
    which METIS may place anywhere), and every edge stays inside its run."""
    X, lab = _clusters(8, 250, 0.05)
    W, _ = build_graph(X, k=10)
    perm = partition_order(W, rows_per_part=250)
    assert sorted(perm.tolist()) == list(range(len(X)))
    runs = lab[perm].reshape(8, 250)
    majority = [np.bincount(r, minlength=8).max() / 250 for r in runs]
    assert min(majority) > 0.85 and len({np.bincount(r).argmax() for r in runs}) == 8
    pos = np.empty_like(perm)
    pos[perm] = np.arange(len(perm))
    C = W.tocoo()
    assert (pos[C.row] // 250 == pos[C.col] // 250).mean() > 0.99
    np.testing.assert_array_equal(partition_order(W, rows_per_part=250), perm)  # deterministic


def _near_diagonal(W, perm, width):
    pos = np.empty_like(perm)
    pos[perm] = np.arange(len(perm))
    C = W.tocoo()
    return float((np.abs(pos[C.row] - pos[C.col]) < width).mean())


def test_more_edges_near_the_diagonal_than_rcm_on_overlapping_clusters():
    X, _ = _clusters(40, 100, 0.6, seed=1)
    W, _ = build_graph(X, k=15)
    p_rcm, p_part = row_order(W, "rcm"), partition_order(W, rows_per_part=100)
    assert _near_diagonal(W, p_part, 100) > _near_diagonal(W, p_rcm, 100) + 0.05


def test_small_graph_and_unknown_order():
    X, _ = _clusters(2, 50, 0.1)
    W, _ = build_graph(X, k=5)
    np.testing.assert_array_equal(partition_order(W, rows_per_part=1024), row_order(W, "rcm"))
    with pytest.raises(ValueError, match="unknown order"):
        row_order(W, "metis")
