"""One pass over the database for a few queries' scores, against BLAS's product and faiss's search."""
import numpy as np
import pytest

from retrieval.knn import exact_search, knn_search
from retrieval.scan import SCAN_MAX, scan_scores


@pytest.mark.parametrize("nq", [1, 3, SCAN_MAX])
def test_scan_scores_equal_the_product(nq):
    rng = np.random.default_rng(nq)
    X = rng.normal(size=(1001, 37)).astype(np.float32)  # rows split unevenly over the threads
    Q = rng.normal(size=(nq, 37)).astype(np.float32)
    np.testing.assert_allclose(scan_scores(Q, X), Q @ X.T, rtol=1e-5, atol=1e-5)


def test_exact_search_of_a_few_queries_equals_faiss():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for nq in (2, SCAN_MAX, SCAN_MAX + 1):  # the scan, and BLAS past SCAN_MAX
        Q = X[rng.integers(0, len(X), nq)] + 0.01 * rng.normal(size=(nq, 16)).astype(np.float32)
        D, I = exact_search(Q, X, 10)
        Df, If = knn_search(Q, X, 10)
        np.testing.assert_array_equal(I, If)
        np.testing.assert_allclose(D, Df, rtol=1e-5, atol=1e-6)
