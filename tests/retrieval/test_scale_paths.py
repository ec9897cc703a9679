"""Fast paths of the graph/diffusion layer against their simple references."""
import numpy as np
import pytest
import scipy.sparse as sp

from retrieval.diffusion import ReorderedSparse, TorchSparse, block_cg, diffusion_operator, diffusion_scores, topk_columns
from retrieval.rankers import DiffusionRanker, KnnRanker, TruncatedRanker
from retrieval.truncated import principal_submatrix, truncated_diffusion
from retrieval.graph import build_graph, graph_from_knn
from retrieval.knn import IndexSpec, build_index, knn_search, merge_topk, recall_at_k, search_index, self_knn, shard_bounds
from retrieval.spectral import katz_centrality, spectral_embedding
from retrieval.whitening import l2_normalize


@pytest.fixture
def data(rng):
    return l2_normalize(rng.normal(size=(600, 12)))


def test_sharded_self_knn_and_graph_equal_unsharded(data):
    D1, I1 = self_knn(data, 9, spec=IndexSpec("flat"), nshards=1)
    D5, I5 = self_knn(data, 9, spec=IndexSpec("flat"), nshards=5)
    np.testing.assert_array_equal(I1, I5)
    np.testing.assert_allclose(D1, D5, rtol=1e-6, atol=1e-6)  # BLAS may round a batch of other size in other bits
    W1, _ = graph_from_knn(D1, I1)
    W5, _ = graph_from_knn(D5, I5)
    np.testing.assert_array_equal(W1.indptr, W5.indptr)
    np.testing.assert_array_equal(W1.indices, W5.indices)
    np.testing.assert_allclose(W1.data, W5.data, rtol=1e-5)
    Wb, _ = build_graph(data, k=8)
    np.testing.assert_allclose(W1.toarray(), Wb.toarray(), atol=1e-6)


def test_shard_bounds_cover_rows():
    b = shard_bounds(10, 3)
    assert b[0][0] == 0 and b[-1][1] == 10 and all(x[1] == y[0] for x, y in zip(b, b[1:]))
    assert shard_bounds(2, 8) == [(0, 1), (1, 2)]


def test_merge_topk_of_database_shards_equals_whole(data):
    Q = data[:20]
    D, I = knn_search(Q, data, 7)
    parts = [(a, b) for a, b in shard_bounds(len(data), 3)]
    Ds, Is = zip(*[(lambda r: (r[0], r[1] + a))(knn_search(Q, data[a:b], 7)) for a, b in parts])
    Dm, Im = merge_topk(list(Ds), list(Is), 7)
    np.testing.assert_array_equal(Im, I)
    np.testing.assert_allclose(Dm, D, atol=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall(data, kind):
    spec = IndexSpec(kind, nlist=8, nprobe=8, ef_search=64)
    _, I = search_index(build_index(data, spec), data[:100], 10)
    _, Iref = knn_search(data[:100], data, 10)
    assert recall_at_k(I, Iref) >= 0.95
    assert recall_at_k(Iref, Iref) == 1.0


def test_duplicate_descriptors_are_handled(data):
    X = np.concatenate([data[:50], data[:50]])  # every row has an exact twin
    W, stats = build_graph(X, k=5)
    assert np.isfinite(W.data).all() and stats.isolated == 0
    np.testing.assert_allclose(W.toarray(), W.toarray().T, atol=1e-6)


def test_block_cg_float32_and_torch_match_float64(data, rng):
    W, _ = build_graph(data, k=8)
    L = diffusion_operator(W, 0.99)
    B = rng.random((600, 5))
    X64, _ = block_cg(L, B, rtol=1e-8, maxiter=500)
    X32, st = block_cg(sp.csr_matrix(L, dtype=np.float32), B, rtol=1e-5, maxiter=500, dtype=np.float32)
    Xt, _ = block_cg(TorchSparse(L), B, rtol=1e-5, maxiter=500, dtype=np.float32)
    R = ReorderedSparse(L, threads=3)
    Xr = R.unpermute(block_cg(R, R.permute(B), rtol=1e-8, maxiter=500)[0])
    np.testing.assert_allclose(R @ R.permute(B), R.permute(L @ B), rtol=1e-12)
    for Xa in (X32, Xt, Xr):
        np.testing.assert_allclose(Xa, X64, rtol=1e-3, atol=1e-3 * np.abs(X64).max())


@pytest.mark.parametrize("matmul", ["scipy", "reordered", "torch", "compiled"])
def test_diffusion_ranker_equals_full_scores(data, matmul):
    W, _ = build_graph(data, k=8)
    D, I = knn_search(data[:30], data, 5)
    S, _ = diffusion_scores(W, D, I, alpha=0.9, rtol=1e-10, maxiter=500)
    dt = np.float32 if matmul == "torch" else np.float64
    ranker = DiffusionRanker(KnnRanker(data), data, W, alpha=0.9, kq=5, rtol=1e-10 if dt == np.float64 else 1e-6, maxiter=500,
                             batch=7, matmul=matmul, dtype=dt)
    r = ranker.rank(data[:30], 20)
    tol = 1e-5 if dt == np.float64 else 1e-3
    np.testing.assert_allclose(r.scores, -np.sort(-S, axis=1)[:, :20], rtol=tol)
    np.testing.assert_allclose(np.take_along_axis(S, r.ids, 1), r.scores, rtol=tol)
    again = ranker.rank(data[:30], 20)  # the operator is built once and reused: same answer
    np.testing.assert_array_equal(again.ids, r.ids)
    idx, vals = topk_columns(S.T, 3)
    np.testing.assert_array_equal(idx, np.argsort(-S, axis=1)[:, :3])


def test_diffusion_ranker_full_ranking_orders_unreached_items_by_similarity(rng):
    X = l2_normalize(rng.normal(size=(60, 6)))
    W = sp.csr_matrix((60, 60))  # no edges: the diffusion reaches only each query's seeds
    r = DiffusionRanker(KnnRanker(X), X, W, alpha=0.9, kq=3).rank(X[:4], 60)
    _, Iknn = knn_search(X[:4], X, 60)
    np.testing.assert_array_equal(np.sort(r.ids[:, :3], axis=1), np.sort(Iknn[:, :3], axis=1))
    np.testing.assert_array_equal(r.ids[:, 3:], Iknn[:, 3:])  # the rest: by plain similarity
    assert (r.scores[:, 3:] == 0).all()


def test_knn_ranker_blas_and_faiss_paths_agree(data):
    small, large = KnnRanker(data, faiss_from=10**9), KnnRanker(data, faiss_from=1)
    for k in (5, 600):
        Ds, Is = small.search(data[:40], k)
        Dl, Il = large.search(data[:40], k)
        np.testing.assert_array_equal(Is[:, :50], Il[:, :50])
        np.testing.assert_allclose(Ds, Dl, atol=1e-5)


def test_principal_submatrix_equals_scipy_indexing(data, rng):
    W, _ = build_graph(data, k=8)
    nodes = rng.choice(600, 90, replace=False)
    pos = np.full(600, -1, np.int64)
    pos[nodes] = np.arange(90)
    got = principal_submatrix(W, nodes, pos)
    np.testing.assert_array_equal(got.toarray(), W[nodes][:, nodes].toarray())


def test_truncated_ranker_pads_short_subgraphs_with_knn(data):
    W, _ = build_graph(data, k=8)
    knn = KnnRanker(data)
    r = TruncatedRanker(knn, W, kq=5, m=30, alpha=0.9, select="mass").rank(data[:3], 100)
    assert r.ids.shape == (3, 100) and all(len(set(row.tolist())) == 100 for row in r.ids)
    assert (r.scores[:, 30:] == 0).all() and r.stats.converged.all()


def test_truncated_with_whole_graph_equals_exact(data):
    W, _ = build_graph(data, k=8)
    D, I = knn_search(data[:4], data, 5)
    _, Iall = knn_search(data[:4], data, 600)
    S, _ = diffusion_scores(W, D, I, alpha=0.95, rtol=1e-10, maxiter=1000)
    ids, sc, st = truncated_diffusion(W, D, I, neighbourhoods=Iall, alpha=0.95, rtol=1e-10, maxiter=1000)
    for q in range(4):
        np.testing.assert_allclose(S[q][ids[q]], sc[q], rtol=1e-6, atol=1e-12)
    assert st.converged.all()
    _, Ism = knn_search(data[:4], data, 50)
    ids_s, _, _ = truncated_diffusion(W, D, I, neighbourhoods=Ism, alpha=0.95)
    assert all(len(i) == 50 for i in ids_s)
    # default: graph neighbourhoods of m nodes; m = n covers the connected graph -> exact again
    ids_g, sc_g, _ = truncated_diffusion(W, D, I, m=600, alpha=0.95, rtol=1e-10, maxiter=1000)
    for q in range(4):
        reached = S[q] > 1e-12
        np.testing.assert_allclose(S[q][ids_g[q]], sc_g[q], rtol=1e-6, atol=1e-12)
        assert set(np.flatnonzero(reached)) <= set(ids_g[q].tolist())


def test_graph_neighbourhood_is_breadth_first(data):
    from retrieval.truncated import graph_neighbourhood

    W, _ = build_graph(data, k=8)
    nb = graph_neighbourhood(W, np.array([0]), 30)
    assert nb[0] == 0 and len(nb) == 30 and len(set(nb.tolist())) == 30
    hop1 = set(W[0].indices.tolist())
    assert set(nb[1 : 1 + len(hop1)].tolist()) == hop1


def test_full_rank_spectral_equals_exact_and_low_rank_approximates(data):
    W, _ = build_graph(data[:200], k=8)
    D, I = knn_search(data[:5], data[:200], 5)
    S, _ = diffusion_scores(W, D, I, alpha=0.9, rtol=1e-12, maxiter=2000)
    from retrieval.diffusion import query_vectors

    Y = query_vectors(D, I, 200, gamma=3.0)
    emb = spectral_embedding(W, rank=200, alpha=0.9)
    np.testing.assert_allclose(emb.scores(Y), S, rtol=1e-4, atol=1e-5 * np.abs(S).max())
    low = spectral_embedding(W, rank=60, alpha=0.9).scores(Y)
    corr = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(low, S)])
    assert corr > 0.8


def test_katz_centrality_solves_the_system(data):
    W, _ = build_graph(data[:200], k=8)
    g = katz_centrality(W, alpha=0.9)
    np.testing.assert_allclose((np.eye(200) - 0.9 * W.toarray()) @ g, np.ones(200), atol=1e-6)


def test_mass_neighbourhoods_equal_the_dense_series(data):
    """Without the beam, the selection is the top-m of sum_t (alpha W)^t y computed densely."""
    from retrieval.truncated import mass_neighbourhoods

    W, _ = build_graph(data, k=8)
    D, I = knn_search(data[:5], data, 4)
    alpha, gamma, hops, m = 0.9, 3.0, 4, 40
    got = mass_neighbourhoods(W, D, I, m, alpha=alpha, gamma=gamma, hops=hops, beam=600, batch=2)
    Wd = W.toarray()
    for q in range(5):
        y = np.zeros(600)
        y[I[q]] = np.maximum(D[q], 0) ** gamma
        acc, cur = y.copy(), y.copy()
        for _ in range(hops):
            cur = alpha * Wd @ cur
            acc += cur
        acc[I[q]] = np.inf
        ref = np.argsort(-acc, kind="stable")[:m]
        assert set(got[q].tolist()) == set(ref.tolist())
    small = mass_neighbourhoods(W, D, I, m, alpha=alpha, gamma=gamma, hops=hops, beam=10)  # the beam prunes, seeds stay
    assert all(set(I[q].tolist()) <= set(small[q].tolist()) and len(small[q]) <= m for q in range(5))


def test_keep_top_per_row_equals_dense_reference(rng):
    from retrieval.truncated import _keep_top_per_row

    A = sp.random(7, 200, density=0.2, random_state=1, format="csr")
    B = _keep_top_per_row(A, 5).toarray()
    for j in range(7):
        row = A.toarray()[j]
        top = np.sort(row[row > 0])[::-1][:5]
        assert np.array_equal(np.sort(B[j][B[j] > 0])[::-1], top)


def test_truncated_mass_selection_with_whole_graph_equals_exact(data):
    W, _ = build_graph(data, k=8)
    D, I = knn_search(data[:4], data, 5)
    S, _ = diffusion_scores(W, D, I, alpha=0.95, rtol=1e-10, maxiter=1000)
    ids, sc, _ = truncated_diffusion(W, D, I, m=600, alpha=0.95, rtol=1e-10, maxiter=1000, select="mass", hops=60, beam=600)
    for q in range(4):
        reached = S[q] > 1e-12
        assert set(np.flatnonzero(reached)) <= set(ids[q].tolist())
        np.testing.assert_allclose(S[q][ids[q]], sc[q], rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="select"):
        truncated_diffusion(W, D, I, m=10, select="magic")
