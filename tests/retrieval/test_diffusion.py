import numpy as np
import pytest

from retrieval.diffusion import block_cg, diffusion_operator, diffusion_scores, query_vectors, rank_by_scores, scipy_cg
from retrieval.graph import build_graph
from retrieval.knn import knn_search
from retrieval.whitening import l2_normalize


@pytest.fixture
def graph(rng):
    X = l2_normalize(rng.normal(size=(150, 8)))
    W, _ = build_graph(X, k=8)
    return X, W


def test_block_cg_equals_dense_solve_and_per_query_cg(graph, rng):
    X, W = graph
    L = diffusion_operator(W, 0.95)
    B = rng.random((150, 7))
    Xb, stats = block_cg(L, B, rtol=1e-10, maxiter=500)
    dense = np.linalg.solve(L.toarray(), B)
    np.testing.assert_allclose(Xb, dense, rtol=1e-7, atol=1e-9)
    for j in range(B.shape[1]):
        x, info = scipy_cg(L, B[:, j], rtol=1e-10, maxiter=500)
        assert info == 0
        np.testing.assert_allclose(Xb[:, j], x, rtol=1e-6, atol=1e-8)
    assert stats.converged.all() and (stats.residuals <= 1e-10 * 1.01).all()


def test_columns_converge_independently(graph, rng):
    _, W = graph
    L = diffusion_operator(W, 0.99)
    B = np.zeros((150, 2))
    B[:, 1] = rng.random(150)  # zero column converges at once
    _, stats = block_cg(L, B, rtol=1e-8, maxiter=500)
    assert stats.iterations[0] == 0 and stats.iterations[1] > 0


def test_non_convergence_is_flagged(graph, rng):
    _, W = graph
    _, stats = block_cg(diffusion_operator(W, 0.99), rng.random((150, 3)), rtol=1e-12, maxiter=2)
    assert not stats.converged.any()
    assert (stats.iterations == 2).all()


def test_query_vectors_and_diffusion_scores(graph):
    X, W = graph
    D, I = knn_search(X[:4], X, 5)
    Y = query_vectors(D, I, 150, gamma=3.0)
    assert Y.shape == (150, 4)
    np.testing.assert_allclose(Y[I[0], 0], np.maximum(D[0], 0) ** 3)
    S, stats = diffusion_scores(W, D, I, alpha=0.9, rtol=1e-10, maxiter=500)
    ref = np.linalg.solve(np.eye(150) - 0.9 * W.toarray().astype(np.float64), Y).T
    np.testing.assert_allclose(S, ref, rtol=1e-6, atol=1e-9)


def test_alpha_out_of_range_is_refused(graph):
    with pytest.raises(ValueError, match="alpha"):
        diffusion_operator(graph[1], 1.0)


def test_rank_by_scores_breaks_ties_with_secondary():
    primary = np.array([[0.0, 2.0, 0.0, 1.0]])
    secondary = np.array([[0.5, 0.0, 0.9, 0.0]])
    np.testing.assert_array_equal(rank_by_scores(primary, secondary)[0], [1, 3, 2, 0])
