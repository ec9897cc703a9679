"""Database-side truncated diffusion (retrieval.precomputed): the compiled row sums against numpy,
the rows against the solver's own solutions, and linearity: untruncated rows sum to the exact
solve of the query's system."""
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from retrieval.graph import build_graph
from retrieval.knn import knn_search
from retrieval.precomputed import ItemRows, RowCombiner, item_rows
from retrieval.rankers import KnnRanker, PrecomputedRanker
from retrieval.truncated_compiled import CompiledTruncatedSolver
from retrieval.whitening import l2_normalize


@pytest.fixture(scope="module")
def graph():
    rng = np.random.default_rng(5)
    X = l2_normalize(rng.normal(size=(800, 10))).astype(np.float32)
    W, _ = build_graph(X, k=10)
    return X, W


def _random_rows(rng, n: int, longest: int, *, shuffled: bool = False) -> ItemRows:
    """Random rows; shuffled: stored in another order than the items' (slot maps items to rows)."""
    lengths = rng.integers(0, longest + 1, n)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate([rng.choice(n, L, replace=False) for L in lengths]).astype(np.int32)
    data = rng.integers(1, 6, indptr[-1]).astype(np.float32) / 4  # few distinct values: ties
    if not shuffled:
        return ItemRows(indptr, indices, data)
    order = rng.permutation(n)  # storage row r holds item order[r]
    parts = [(indices[indptr[i]:indptr[i + 1]], data[indptr[i]:indptr[i + 1]]) for i in order]
    slot = np.empty(n, np.int64)
    slot[order] = np.arange(n)
    return ItemRows(np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64), np.concatenate([p[0] for p in parts]),
                    np.concatenate([p[1] for p in parts]), slot)


def _reference_top(rows: ItemRows, Y: np.ndarray, I: np.ndarray, k: int):
    by_item = [rows.row(i) for i in range(rows.n)]
    indptr = np.concatenate([[0], np.cumsum([len(r[0]) for r in by_item])])
    F = sp.csr_matrix((np.concatenate([r[1] for r in by_item]).astype(np.float64), np.concatenate([r[0] for r in by_item]), indptr),
                      shape=(rows.n, rows.n))
    out = []
    for y, seeds in zip(Y, I):
        keep = (seeds >= 0) & (y > 0)
        x = np.asarray(F[seeds[keep]].T @ y[keep]).ravel() if keep.any() else np.zeros(rows.n)
        touched = np.unique(F[seeds[keep]].indices) if keep.any() else np.zeros(0, np.int64)
        order = touched[np.lexsort((touched, -x[touched]))][:k]  # by score, ties by row
        out.append((order, x[order]))
    return out


@pytest.mark.parametrize("k,threads,chunk,shuffled", [(5, 1, 64, False), (40, 2, 3, True), (1000, 2, 1, False)])
def test_row_sums_equal_numpy(k, threads, chunk, shuffled):
    """Weighted sums of seeds' rows, top k by score and ties by row; -1 seeds and weights <= 0
    skipped; a query with no usable seed gets an empty list; the scratch is left clean; rows
    stored in another order than the items' are found through the item-to-row map."""
    rng = np.random.default_rng(0)
    rows = _random_rows(rng, 300, 60, shuffled=shuffled)
    I = rng.integers(0, 300, (25, 6))
    I[0, 2:] = -1
    I[1] = -1
    Y = rng.integers(0, 4, (25, 6)).astype(np.float64)
    Y[2, 0] = -1.0
    comb = RowCombiner(rows, threads=threads, chunk=chunk)
    for _ in range(2):  # the second call reuses the scratch
        ids, sc = comb.top(Y, I, k)
        for q, (ri, rs) in enumerate(_reference_top(rows, Y, I, k)):
            np.testing.assert_array_equal(ids[q], ri, err_msg=f"query {q}")
            np.testing.assert_allclose(sc[q], rs, rtol=1e-6)
    assert ids[1].size == 0


def test_item_rows_are_the_solvers_solutions(graph):
    """In groups of one, row i is the solver's solution seeded at i alone (weight 1), its `keep`
    strongest entries; rows are stored in the solver's order, every item once."""
    _, W = graph
    solver = CompiledTruncatedSolver(W, m=200, alpha=0.95, rtol=1e-8, maxiter=300, hops=6, beam=100)
    seen = []
    rows = item_rows(solver, 50, group=1, chunk=300, progress=seen.append)
    assert seen == [300, 600, 800]
    np.testing.assert_array_equal(np.sort(rows.slot), np.arange(800))
    np.testing.assert_array_equal(rows.slot[solver.perm], np.arange(800))  # stored in the solver's row order
    items = np.array([0, 7, 799])
    ids, sc, _ = solver.solve(np.ones((3, 1)), items[:, None])
    for r, i, s in zip(items, ids, sc):
        got_i, got_s = rows.row(r)
        np.testing.assert_array_equal(got_i, i[:50])
        np.testing.assert_allclose(got_s, s[:50], rtol=1e-6)
    assert rows.indices.dtype == np.int32 and rows.data.dtype == np.float32


@pytest.mark.parametrize("group", [3, 4])
def test_grouped_rows_solve_their_groups_subgraph(graph, group):
    """With `group` items per selection, an item's row is the exact solution of (I - alpha W_S) x =
    e_item on the subgraph S that the solver selects from the whole group (seeds of weight 1);
    groups are consecutive in the solver's row order, the last one shorter."""
    _, W = graph
    alpha = 0.95
    solver = CompiledTruncatedSolver(W, m=150, alpha=alpha, rtol=1e-10, maxiter=500, hops=6, beam=120)
    rows = item_rows(solver, 1000, group=group, chunk=64)
    n = W.shape[0]
    for g0 in (0, group * 37, n - n % group if n % group else n - group):
        items = solver.perm[g0 : g0 + group]
        S, _, _ = solver.solve(np.ones((1, len(items))), items[None, :])
        S = np.sort(S[0])
        A = (sp.identity(len(S)) - alpha * W[S][:, S]).tocsc()
        for item in items:
            x = spla.spsolve(A, (S == item).astype(np.float64))
            got_i, got_s = rows.row(item)
            assert set(got_i.tolist()) == set(S.tolist())
            np.testing.assert_allclose(got_s, x[np.searchsorted(S, got_i)], rtol=1e-6, atol=1e-12)
            assert (np.diff(got_s) <= 0).all()
    with pytest.raises(ValueError, match="group"):
        item_rows(solver, 10, group=0)


def test_rows_that_did_not_converge_are_counted(graph, caplog):
    """A row whose CG stops at maxiter before rtol is kept and counted in one warning."""
    _, W = graph
    tight = CompiledTruncatedSolver(W, m=100, alpha=0.99, rtol=1e-14, maxiter=2, hops=4, beam=60)
    with caplog.at_level("WARNING", logger="retrieval.precomputed"):
        rows = item_rows(tight, 20, group=4)
    assert rows.n == W.shape[0]
    assert [r.getMessage().split(" rows stopped")[0] for r in caplog.records] == [f"precomputed: {W.shape[0]} of {W.shape[0]}"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="retrieval.precomputed"):
        item_rows(CompiledTruncatedSolver(W, m=100, alpha=0.9, rtol=1e-6, maxiter=500, hops=4, beam=60), 20, group=4)
    assert not caplog.records


@pytest.mark.parametrize("group", [1, 3])
def test_untruncated_rows_sum_to_the_exact_solve(graph, group):
    """Linearity: with every node in each item's subgraph and every entry kept, the seeds' rows
    weighted by similarity^gamma sum to the solution of (I - alpha W) x = y (scipy's direct solve)."""
    X, W = graph
    n, alpha, gamma, kq = W.shape[0], 0.9, 3.0, 5
    solver = CompiledTruncatedSolver(W, m=n, alpha=alpha, rtol=1e-12, maxiter=2000, hops=60)
    rows = item_rows(solver, n, group=group)
    ranker = PrecomputedRanker(KnnRanker(X), rows, gamma=gamma, kq=kq)
    rng = np.random.default_rng(1)
    Q = l2_normalize(X[:6] + 0.05 * rng.normal(size=(6, X.shape[1]))).astype(np.float32)
    res = ranker.rank(Q, 20)
    D, I = knn_search(Q, X, kq)
    L = (sp.identity(n) - alpha * W).tocsc()
    for q in range(len(Q)):
        y = np.zeros(n)
        y[I[q]] = np.maximum(D[q], 0) ** gamma
        x = spla.spsolve(L, y)
        np.testing.assert_allclose(res.scores[q], np.sort(x)[::-1][:20], rtol=1e-5)
        np.testing.assert_allclose(x[res.ids[q]], res.scores[q], rtol=1e-5)


def test_short_rankings_are_padded_by_similarity(graph):
    """Rankings longer than the rows' union continue with the nearest remaining items."""
    X, W = graph
    solver = CompiledTruncatedSolver(W, m=30, alpha=0.9, rtol=1e-8, hops=4, beam=20)
    ranker = PrecomputedRanker(KnnRanker(X), item_rows(solver, 10), kq=3)
    res = ranker.rank(X[:4], 200)
    assert res.ids.shape == (4, 200) and all(len(set(r)) == 200 for r in res.ids.tolist())
    assert (res.scores[:, -1] == 0).all()  # the padded tail has no diffusion score
    with pytest.raises(ValueError, match="cover"):
        PrecomputedRanker(KnnRanker(X[:10]), item_rows(solver, 10))
