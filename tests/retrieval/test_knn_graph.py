import numpy as np
import pytest
import scipy.sparse as sp

from retrieval.graph import affinity_from_knn, build_graph, normalize_symmetric
from retrieval.knn import exact_search, knn_search, knn_search_numpy
from retrieval.whitening import l2_normalize


def _data(rng, n=300, d=16):
    return l2_normalize(rng.normal(size=(n, d)))


def test_faiss_knn_matches_numpy(rng):
    X = _data(rng)
    Q = _data(rng, 20)
    D, I = knn_search(Q, X, 10)
    Dr, Ir = knn_search_numpy(Q, X, 10)
    np.testing.assert_allclose(D, Dr, atol=1e-5)
    # ties are practically absent on continuous data: ids must agree exactly
    np.testing.assert_array_equal(I, Ir)


@pytest.mark.parametrize("k,block", [(10, 1 << 25), (7, 900), (300, 300 * 3)])
def test_blocked_exact_search_matches_numpy_and_faiss(rng, k, block):
    """The rankers' exact search (blocked products + partial sort) against the brute-force reference,
    across query blocks, and with k = n (a whole ranking); ties ordered by lower index."""
    X = _data(rng)
    Q = _data(rng, 20)
    D, I = exact_search(Q, X, k, block_floats=block)
    Dr, Ir = knn_search_numpy(Q, X, k)
    np.testing.assert_allclose(D, Dr, atol=1e-5)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_array_equal(I[:, :5], knn_search(Q, X, 5)[1])
    Xt = np.repeat(X[:3], 4, axis=0)  # exact ties: lower index first
    _, It = exact_search(Xt[:1], Xt, 6)
    np.testing.assert_array_equal(It[0, :4], [0, 1, 2, 3])
    same = np.repeat(X[:1], 20, axis=0)  # ties across the cut: the lowest indices are kept
    _, Is = exact_search(same[:2], same, 3)
    np.testing.assert_array_equal(Is, [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(Is[0], knn_search_numpy(same[:1], same, 3)[1][0])
    assert exact_search(Q, X, 0)[1].shape == (20, 0)


def test_knn_refuses_nan_and_dim_mismatch(rng):
    X = _data(rng)
    bad = X.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        knn_search(X[:2], bad, 3)
    with pytest.raises(ValueError, match="dimension mismatch"):
        knn_search(X[:2, :8], X, 3)


def _dense_reference(X, k, gamma):
    """Reciprocal kNN affinity and normalisation with dense numpy loops."""
    n = X.shape[0]
    S = X @ X.T
    nn = [set(np.argsort(-S[i], kind="stable")[: k + 1]) - {i} for i in range(n)]
    A = np.zeros((n, n))
    for i in range(n):
        for j in nn[i]:
            if i in nn[j]:
                A[i, j] = max(S[i, j], 0) ** gamma
    d = A.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    return A, inv[:, None] * A * inv[None, :]


def test_graph_matches_dense_reference(rng):
    X = _data(rng, 120, 8)
    W, stats = build_graph(X, k=6, gamma=3.0)
    A_ref, W_ref = _dense_reference(X, 6, 3.0)
    np.testing.assert_allclose(W.toarray(), W_ref, atol=1e-5)
    assert stats.nnz == int((A_ref > 0).sum())


def test_graph_properties(rng):
    X = _data(rng, 200, 8)
    W, stats = build_graph(X, k=10)
    Wd = W.toarray()
    np.testing.assert_allclose(Wd, Wd.T, atol=1e-6)  # reciprocal -> symmetric
    assert np.all(np.diag(Wd) == 0)
    assert np.all(Wd >= 0)
    # symmetric normalisation: spectral radius <= 1
    assert np.max(np.abs(np.linalg.eigvalsh(Wd.astype(np.float64)))) <= 1 + 1e-5


def test_isolated_nodes_are_not_divided_by_zero():
    # node 2 lists 0 and 1, but they prefer each other and node 3: no mutual edge for 2
    D = np.array([[1, 0.9, 0.5], [1, 0.9, 0.5], [1, 0.2, 0.1], [1, 0.8, 0.7]], dtype=np.float32)
    I = np.array([[0, 1, 3], [1, 0, 3], [2, 0, 1], [3, 0, 1]])
    A = affinity_from_knn(D, I, gamma=1.0)
    W, deg = normalize_symmetric(A)
    assert deg[2] == 0
    assert np.isfinite(W.data).all()
    assert W[2].nnz == 0 and W[:, 2].nnz == 0


def test_non_reciprocal_symmetrises_by_max(rng):
    X = _data(rng, 50, 4)
    D, I = knn_search(X, X, 6)
    A = affinity_from_knn(D, I, gamma=1.0, reciprocal=False)
    Ar = affinity_from_knn(D, I, gamma=1.0, reciprocal=True)
    assert sp.csr_matrix(A - A.T).count_nonzero() == 0
    assert A.nnz >= Ar.nnz


def _same_lists_up_to_ties(D, I, Df, If, tol=1e-6):
    """Equal kNN lists, except that near-equal similarities (within tol: the rounding of a dot
    product in another BLAS call) may swap places."""
    np.testing.assert_allclose(D, Df, atol=tol)
    r, c = np.nonzero(I != If)
    for i in np.unique(r):
        near = np.abs(Df[i][None, :] - Df[i][c[r == i]][:, None]) <= tol
        assert near.sum(axis=1).min() >= 2, f"row {i}: lists differ beyond ties"
        assert set(I[i][np.abs(D[i] - D[i, -1]) > tol]) == set(If[i][np.abs(Df[i] - Df[i, -1]) > tol])


def test_extended_knn_graph_equals_a_rebuild():
    """Issue 13: adding images updates the kNN lists (one product of the new rows with all rows,
    read once for the new lists and the old lists they enter) and the lists and graph equal a full
    rebuild with an exact index, whatever the tile size (tiles down to one row and a few columns)."""
    from retrieval.graph import graph_from_knn
    from retrieval.knn import knn_search
    from retrieval.knn_update import extend_knn, grown_lists
    from retrieval.whitening import l2_normalize

    rng = np.random.default_rng(3)
    X = l2_normalize(rng.normal(size=(600, 24))).astype(np.float32)
    n0, k = 500, 10
    D0, I0 = knn_search(X[:n0], X[:n0], k + 1)
    Df, If = knn_search(X, X, k + 1)
    for tile in (1 << 21, 37):
        D, I = grown_lists(D0, I0, len(X))
        changed = extend_knn(D, I, X, n0, tile_floats=tile)
        assert I.dtype == np.int32 and D.dtype == np.float32
        _same_lists_up_to_ties(D, I, Df, If)
    assert changed == int((If[:n0] >= n0).any(axis=1).sum()) > 0  # the old lists new rows entered: merged
    W, st = graph_from_knn(D, I, gamma=3.0)
    Wf, stf = graph_from_knn(Df, If, gamma=3.0)
    assert st.nnz == stf.nnz and st.isolated == stf.isolated  # the same edges, weights up to the dot products' rounding
    np.testing.assert_array_equal(W.indices, Wf.indices)
    np.testing.assert_allclose(W.data, Wf.data, rtol=1e-5)
    with pytest.raises(ValueError, match="rows for lists of"):
        extend_knn(D, I, X[:n0 + 5], n0)
    with pytest.raises(ValueError, match="an update needs full old lists"):
        extend_knn(*grown_lists(D0[:2, :3], I0[:2, :3], 4), X[:4], 2)
    Dl, Il = grown_lists(lambda: D0, lambda: I0, len(X))  # loaded one at a time (an .npz's members): the same old rows
    np.testing.assert_array_equal(Dl[:n0], D0)
    np.testing.assert_array_equal(Il[:n0], I0)
    with pytest.raises(ValueError, match="ids of shape"):
        grown_lists(D0, I0[:, :3], len(X))


def test_extended_knn_takes_a_hub_that_enters_many_old_lists():
    """A new row that enters more old lists than the scan's buffer holds (8 (k+1)): its block is
    scanned again with room for all, and the lists still equal a rebuild."""
    from retrieval.knn import knn_search
    from retrieval.knn_update import extend_knn, grown_lists
    from retrieval.whitening import l2_normalize

    rng = np.random.default_rng(4)
    u = l2_normalize(rng.normal(size=(1, 16)))
    cluster = l2_normalize(u + 0.05 * rng.normal(size=(200, 16)))
    X = np.vstack([l2_normalize(rng.normal(size=(300, 16))), cluster, u, l2_normalize(rng.normal(size=(5, 16)))]).astype(np.float32)
    n0, kk = 500, 3
    D0, I0 = knn_search(X[:n0], X[:n0], kk)
    Df, If = knn_search(X, X, kk)
    assert (If[:n0] == n0).sum() > 8 * kk  # the hub really overflows the first buffer
    D, I = grown_lists(D0, I0, len(X))
    extend_knn(D, I, X, n0, tile_floats=1000)
    _same_lists_up_to_ties(D, I, Df, If)


def test_searched_update_merges_reverse_neighbours():
    """Approximate update: new rows' lists as an index found them; an old row takes exactly the
    new rows that list it and beat its last entry. With exact lists for the new rows, every old row
    whose new true neighbours all list it back equals the rebuild; recall stays high overall."""
    from retrieval.knn import knn_search, recall_at_k
    from retrieval.knn_update import extend_knn_searched, grown_lists
    from retrieval.whitening import l2_normalize

    rng = np.random.default_rng(5)
    X = l2_normalize(rng.normal(size=(800, 12))).astype(np.float32)
    n0, kk = 700, 8
    D0, I0 = knn_search(X[:n0], X[:n0], kk)
    Dn, In = knn_search(X[n0:], X, kk)
    Df, If = knn_search(X, X, kk)
    D, I = grown_lists(D0, I0, len(X))
    changed = extend_knn_searched(D, I, n0, Dn, In)
    np.testing.assert_array_equal(I[n0:], In)
    listed_by = [set() for _ in range(n0)]
    for j, row in enumerate(In):
        for i in row[row < n0]:
            listed_by[i].add(n0 + j)
    exact_rows = [i for i in range(n0) if {j for j in If[i] if j >= n0} <= listed_by[i]]
    assert len(exact_rows) > n0 // 2
    np.testing.assert_array_equal(I[exact_rows], If[exact_rows])
    assert changed == sum(1 for i in range(n0) if (I[i] >= n0).any())
    assert recall_at_k(I, If) > 0.95
    Dw, Iw = knn_search(X[n0:], X, 2 * kk)  # longer new lists: more reverse candidates, the new lists themselves unchanged
    D2, I2 = grown_lists(D0, I0, len(X))
    changed2 = extend_knn_searched(D2, I2, n0, Dw, Iw)
    np.testing.assert_array_equal(I2[n0:], In)
    assert changed2 >= changed and recall_at_k(I2, If) > recall_at_k(I, If)
    with pytest.raises(ValueError, match="width >= 8"):
        extend_knn_searched(D2, I2, n0, Dn[:, :3], In[:, :3])


def test_hnsw_self_search_starts_at_each_rows_own_node():
    """An HNSW index searches the rows it holds from their own nodes on level 0: similarities
    are the true inner products (self first), recall against an exact search as good as the
    ordinary search's, and rows held at an offset (an update's new rows) are found the same way;
    a flat index searches as before."""
    from retrieval.knn import IndexSpec, build_index, knn_search, recall_at_k, search_self, search_shards, shard_bounds
    from retrieval.synthetic_manifold import ManifoldSpec, make_manifold_dataset

    X = make_manifold_dataset(ManifoldSpec(n=4000, n_queries=1, shared_dim=16, seed=3))[0].astype(np.float32)
    index = build_index(X, IndexSpec(kind="hnsw", hnsw_m=16, ef_construction=40, ef_search=48))
    bounds = shard_bounds(len(X), 3)
    _, Iref = knn_search(X, X, 11)
    D, I = search_self(index, X, 11, bounds, ids=np.int32)
    Ds, Is = search_shards(index, X, 11, bounds)
    assert I.dtype == np.int32 and (I[:, 0] == np.arange(len(X))).mean() > 0.99
    assert recall_at_k(I, Iref) >= recall_at_k(Is, Iref) - 0.01 and recall_at_k(I, Iref) > 0.9
    sims = np.einsum("ij,ij->i", X[I[:, 0]], X)  # the first entries' true values
    np.testing.assert_allclose(D[:, 0], sims, rtol=1e-5)
    assert (np.diff(D, axis=1) <= 1e-6).all()  # descending
    D2, I2 = search_self(index, X[3000:], 11, shard_bounds(1000, 2), first=3000)
    np.testing.assert_array_equal(I2, I[3000:])
    Df, If = search_self(build_index(X, IndexSpec(kind="flat")), X[:50], 11, [(0, 50)])
    np.testing.assert_array_equal(If, Iref[:50])


@pytest.mark.parametrize("storage", ["sq8", "fp16"])
def test_quantized_hnsw_lists_are_rescored_on_the_float_rows(storage):
    """An HNSW index over a scalar quantizer (8 bits or fp16 per dimension) searches REFINE x k
    candidates and keeps the top k by their exact inner products with the float rows: every
    similarity is the true one, descending, recall as good as the float index's within 0.02;
    a search without the rows returns the index's own (quantized) scores; an offset search
    without the rows is refused."""
    from retrieval.knn import (
        IndexSpec, build_index, quantized, recall_at_k, refine_exact, search_index, search_self, search_width, shard_bounds,
    )
    from retrieval.synthetic_manifold import ManifoldSpec, make_manifold_dataset

    X, _, Q, _ = make_manifold_dataset(ManifoldSpec(n=4000, n_queries=30, shared_dim=16, seed=3))
    spec = IndexSpec(kind="hnsw", hnsw_m=16, ef_construction=40, ef_search=48)
    flat_hnsw, index = build_index(X, spec), build_index(X, IndexSpec(**{**spec.__dict__, "storage": storage}))
    assert quantized(index) and not quantized(flat_hnsw) and search_width(index, 40) == 50 and search_width(flat_hnsw, 40) == 40
    _, Iref = knn_search(X, X, 11)
    D, I = search_self(index, X, 11, shard_bounds(len(X), 3), ids=np.int32)
    np.testing.assert_allclose(D, np.einsum("id,ikd->ik", X, X[I]), rtol=1e-5, atol=1e-6)  # exact, not quantized
    assert (np.diff(D, axis=1) <= 0).all() and (I[:, 0] == np.arange(len(X))).mean() > 0.99
    _, If = search_self(flat_hnsw, X, 11, shard_bounds(len(X), 3))
    assert recall_at_k(I, Iref) >= recall_at_k(If, Iref) - 0.02 and recall_at_k(I, Iref) > 0.9
    with pytest.raises(ValueError, match="float rows"):
        search_self(index, X[3000:], 11, [(0, 1000)], first=3000)
    D2, I2 = search_self(index, X[3000:], 11, [(0, 1000)], first=3000, database=X)
    np.testing.assert_array_equal(I2, I[3000:])
    Dq, Iq = search_index(index, Q, 10, database=X)
    np.testing.assert_allclose(Dq, np.einsum("id,ikd->ik", Q, X[Iq]), rtol=1e-5, atol=1e-6)
    from retrieval.rankers import KnnRanker

    Ds, Is = KnnRanker(X, seed_index=index).seeds(Q, 10)  # a graph method's seeds: re-scored on the rows too
    np.testing.assert_array_equal(Is, Iq)
    np.testing.assert_allclose(Ds, Dq, rtol=1e-6)
    Draw, _ = search_index(index, Q, 10)
    if storage == "sq8":  # its own scores: quantized
        assert np.abs(Draw - Dq).max() > 1e-5
    # the re-scoring against numpy: the top k of each row's candidates by exact similarity
    cand = np.random.default_rng(0).integers(-1, len(X), size=(30, 20))
    Dr, Ir = refine_exact(Q, X, cand, 7)
    S = np.where(cand >= 0, np.einsum("id,ikd->ik", Q, X[np.maximum(cand, 0)]), -np.inf)
    order = np.argsort(-S, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(Ir, np.take_along_axis(cand, order, 1))
    np.testing.assert_allclose(Dr, np.take_along_axis(S, order, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="past the database"):  # rows the database does not have: refused, never read
        refine_exact(Q, X[:100], cand, 7)
