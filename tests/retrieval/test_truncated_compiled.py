"""The compiled truncated-diffusion kernel against its scipy reference (retrieval.truncated)."""
import numpy as np
import pytest

from retrieval.graph import build_graph
from retrieval.knn import knn_search
from retrieval.rankers import KnnRanker, TruncatedRanker
from retrieval.truncated import TruncatedSolver
from retrieval.truncated_compiled import _SPAN, _SUB, CompiledTruncatedSolver, _top_threshold
from retrieval.whitening import l2_normalize


@pytest.fixture(scope="module")
def graph():
    rng = np.random.default_rng(3)
    X = l2_normalize(rng.normal(size=(2500, 12))).astype(np.float32)
    W, _ = build_graph(X, k=10)
    D, I = knn_search(X[:40], X, 8)
    return X, W, D, I


def _assert_same(ref, got, *, rtol=1e-7):
    ids_r, sc_r, st_r = ref
    ids_c, sc_c, st_c = got
    assert len(ids_r) == len(ids_c)
    for q in range(len(ids_r)):
        assert set(ids_r[q].tolist()) == set(ids_c[q].tolist()), f"query {q}: different subgraphs"
        np.testing.assert_allclose(sc_c[q], sc_r[q], rtol=rtol, atol=1e-12)
    np.testing.assert_array_equal(st_c.iterations, st_r.iterations)
    assert st_c.converged.all()


@pytest.mark.parametrize("m,hops,beam,edges,reorder", [
    (300, 8, 150, 0, True), (2500, 4, None, 0, False), (200, 12, 60, 4, True), (50, 3, 20, 0, True),
    (4, 10, 600, 0, True),  # the beam visits far more rows than the selection keeps: their copies outgrow the room
])
def test_compiled_equals_scipy_reference(graph, m, hops, beam, edges, reorder):
    _, W, D, I = graph
    params = dict(m=m, alpha=0.95, gamma=3.0, rtol=1e-8, maxiter=500, hops=hops, beam=beam, select_edges=edges)
    ref = TruncatedSolver(W, select="mass", threads=1, **params).solve(D, I)
    got = CompiledTruncatedSolver(W, reorder=reorder, threads=2, chunk=7, **params).solve(D, I)
    _assert_same(ref, got)


def test_compiled_edge_cases(graph):
    """-1 seeds ignored, a seed of similarity <= 0 kept but not propagated, m below the number of
    seeds keeps the seeds only, an empty batch; the reused scratch gives the same answer twice."""
    _, W, D, I = graph
    D, I = D[:6].copy(), I[:6].copy()
    I[0, 3:] = -1
    D[1, 2] = -0.5
    params = dict(alpha=0.9, rtol=1e-8, maxiter=500, hops=5, beam=40)
    for m in (4, 120):
        ref = TruncatedSolver(W, m=m, select="mass", threads=1, **params).solve(D, I)
        solver = CompiledTruncatedSolver(W, m=m, threads=1, **params)
        _assert_same(ref, solver.solve(D, I))
        _assert_same(ref, solver.solve(D, I))  # scratch left clean by the first call
    ids, sc, st = CompiledTruncatedSolver(W, m=50, **params).solve(D[:0], I[:0])
    assert ids == [] and sc == [] and st.iterations.size == 0


def test_top_threshold_equals_partition():
    rng = np.random.default_rng(0)
    counts, buf = np.empty(_SPAN * _SUB, np.int64), np.empty(5000)
    for vals in (rng.random(5000), np.exp(rng.normal(scale=40, size=5000)), np.repeat(rng.random(50), 100)):
        for k in (1, 7, 100, 4999):
            want = np.sort(vals)[::-1][k - 1]
            assert _top_threshold(vals.copy(), vals.size, k, counts, buf) == want


def test_truncated_ranker_kernels_agree(graph):
    X, W, _, _ = graph
    knn = KnnRanker(X)
    a = TruncatedRanker(knn, W, kq=6, m=150, alpha=0.95, rtol=1e-8, select="mass", kernel="compiled").rank(X[:12], 200)
    b = TruncatedRanker(knn, W, kq=6, m=150, alpha=0.95, rtol=1e-8, select="mass", kernel="scipy").rank(X[:12], 200)
    for q in range(12):  # equal scores may swap places; the first 150 are the same subgraph
        assert set(a.ids[q, :150].tolist()) == set(b.ids[q, :150].tolist())
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    with pytest.raises(ValueError, match="kernel"):
        TruncatedRanker(knn, W, kernel="cuda")


def test_approximate_seeds_rank_like_exact_ones_and_short_rankings_are_padded_exactly(graph):
    """TruncatedRanker with an HNSW seed index: the seeds come from the index, the tail of a
    ranking shorter than topk from the exact search (only those queries are searched)."""
    from retrieval.knn import IndexSpec, build_index, knn_search_numpy

    X, W, _, _ = graph
    Q = l2_normalize(X[:40] + 0.05 * np.random.default_rng(4).normal(size=(40, X.shape[1]))).astype(np.float32)
    exact_knn = KnnRanker(X)
    approx_knn = KnnRanker(X, seed_index=build_index(X, IndexSpec("hnsw", hnsw_m=16, ef_construction=200, ef_search=400)))
    np.testing.assert_array_equal(approx_knn.seeds(Q, 10)[1], knn_search_numpy(Q, X, 10)[1])
    for m in (40, 400):  # m 40 < topk: every ranking is padded with the exact top of the rest
        a = TruncatedRanker(approx_knn, W, kq=10, m=m, hops=4).rank(Q, 100)
        e = TruncatedRanker(exact_knn, W, kq=10, m=m, hops=4).rank(Q, 100)
        np.testing.assert_array_equal(a.ids, e.ids)
        assert all(len(set(r.tolist())) == 100 for r in a.ids)
    approx_knn.seed_index = build_index(X[:100], IndexSpec("hnsw"))  # an index over other rows is refused
    with pytest.raises(ValueError, match="seed index has 100 rows"):
        TruncatedRanker(approx_knn, W, kq=10, m=40).rank(Q, 100)


def test_repeated_seeds_add_up_in_both_kernels(graph):
    """A seed listed twice weighs twice (as query_vectors sums it, and as regional diffusion's grouped
    region seeds need): the same as one seed of weight 2 d^gamma, in the compiled kernel and the reference."""
    _, W, D, I = graph
    gamma = 3.0
    D2, I2 = np.concatenate([D, D[:, :3]], axis=1), np.concatenate([I, I[:, :3]], axis=1)
    Dw = D.astype(np.float64).copy()
    Dw[:, :3] = (2 * np.maximum(Dw[:, :3], 0) ** gamma) ** (1 / gamma)
    params = dict(m=300, alpha=0.95, gamma=gamma, rtol=1e-9, maxiter=500, hops=8, beam=150)
    for solver in (TruncatedSolver(W, select="mass", threads=1, **params), CompiledTruncatedSolver(W, threads=2, **params)):
        _assert_same(solver.solve(Dw, I), solver.solve(D2, I2), rtol=1e-6)
