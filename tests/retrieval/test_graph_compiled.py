"""The compiled reciprocal graph against the numpy reference (retrieval.graph)."""
import numpy as np
import pytest

from retrieval.graph import affinity_from_knn, normalize_symmetric
from retrieval.graph_compiled import reciprocal_graph
from retrieval.knn import knn_search
from retrieval.whitening import l2_normalize


def _lists(n=1500, d=8, k=12, seed=0):
    rng = np.random.default_rng(seed)
    X = l2_normalize(rng.normal(size=(n, d))).astype(np.float32)
    D, I = knn_search(X, X, k)
    return D, I


def _assert_same(D, I, gamma, **kw):
    W_ref, deg_ref = normalize_symmetric(affinity_from_knn(D, I, gamma=gamma))
    W, deg = reciprocal_graph(D, I, gamma=gamma, **kw)
    assert W.shape == W_ref.shape and W.dtype == np.float32 and W.has_sorted_indices
    np.testing.assert_array_equal(W.indptr, W_ref.indptr)
    np.testing.assert_array_equal(W.indices, W_ref.indices)
    np.testing.assert_allclose(W.data, W_ref.data, rtol=2e-6)
    np.testing.assert_allclose(deg, deg_ref, rtol=2e-6)
    assert (W != W.T).nnz == 0 and W.diagonal().sum() == 0
    return W


@pytest.mark.parametrize("gamma,threads", [(3.0, 1), (3.0, 3), (1.0, 2)])
def test_equals_the_numpy_reference(gamma, threads):
    D, I = _lists()
    _assert_same(D, I, gamma, threads=threads)


def test_padding_self_matches_repeats_and_negative_similarities():
    """-1 padding and self matches dropped, a repeated neighbour counted once, non-positive
    similarities never an edge, int32 lists as good as int64, an isolated node an empty row."""
    D, I = _lists(n=600, k=10, seed=1)
    D, I = D.copy(), I.copy()
    I[5, 3:] = -1
    I[7, 4] = I[7, 2]  # a repeat
    D[9, 1:] = -np.abs(D[9, 1:])  # node 9 sees only non-positive similarities ...
    rows = np.flatnonzero((I == 9).any(axis=1))
    D[rows] = np.where(I[rows] == 9, -np.abs(D[rows]), D[rows])  # ... and so do the lists naming it
    W = _assert_same(D, I, 3.0, threads=2)
    assert W[9].nnz == 0 and W[:, 9].nnz == 0
    W32, _ = reciprocal_graph(D, I.astype(np.int32), gamma=3.0)
    assert (W32 != W).nnz == 0


def test_empty_and_tiny():
    W, deg = reciprocal_graph(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))
    assert W.shape == (0, 0) and deg.size == 0
    D, I = _lists(n=3, k=3)
    _assert_same(D, I, 3.0)
