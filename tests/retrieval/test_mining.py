"""Manifold mining on two parallel arcs of the unit sphere: each arc is a manifold (its kNN graph
follows it), while the other arc is Euclidean-near. Hard positives must lie further along the
anchor's own arc than its Euclidean neighbours; hard negatives must be the nearest points of the
other arc."""
import numpy as np
import pytest

from retrieval.mining import Tuples, manifold_tuples, mine_tuples, random_tuples

STEP, GAP, PER_ARC = 0.05, 0.22, 40  # angle between neighbours on an arc, latitude gap between arcs


def two_arcs():
    t = np.arange(PER_ARC) * STEP
    arcs = []
    for lat in (0.0, GAP):
        arcs.append(np.stack([np.cos(lat) * np.cos(t), np.cos(lat) * np.sin(t), np.full_like(t, np.sin(lat))], 1))
    X = np.concatenate(arcs).astype(np.float32)
    arc = np.repeat([0, 1], PER_ARC)
    pos = np.tile(np.arange(PER_ARC), 2)  # position along the arc
    return X, arc, pos


MINE = dict(k=4, kq=1, euclid_k=4, pos_k=12, neg_pool=20, neg_exclude_k=30)


def test_two_arcs_are_planted_as_intended():
    X, arc, _ = two_arcs()
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    top4 = np.argsort(-S, axis=1)[:, :4]
    assert (arc[top4] == arc[:, None]).all()  # the 4 nearest are on the same arc: the graph follows the arcs
    top12 = np.argsort(-S, axis=1)[:, :12]
    assert (arc[top12] != arc[:, None]).any(axis=1).all()  # but the other arc is Euclidean-near for every point


def test_manifold_mining_picks_planted_hard_positives_and_negatives():
    X, arc, pos = two_arcs()
    T = manifold_tuples(X, n_tuples=30, n_neg=2, rng=np.random.default_rng(0), **MINE)
    assert len(T) == 30 and T.negatives.shape == (30, 2)
    S = X @ X.T
    for a, p, negs in zip(T.anchors, T.positives, T.negatives):
        assert arc[p] == arc[a], "positive must come from the anchor's own arc (its manifold)"
        euclid = [j for j in np.argsort(-S[a]) if j != a][: MINE["euclid_k"]]
        assert p not in euclid, "positive must not be one of the nearest Euclidean neighbours (hard positive)"
        assert abs(pos[p] - pos[a]) > 2  # further along the arc than the 2 steps the nearest neighbours cover
        assert (arc[negs] != arc[a]).all(), "negatives must come from the other arc"
        other = np.flatnonzero(arc != arc[a])
        best = np.sort(S[a, other])[::-1][:2]  # (ties between left and right neighbours: compare similarities)
        assert np.allclose(np.sort(S[a, negs])[::-1], best, atol=1e-6), "the two Euclidean-nearest points of the other arc"
    assert len(set(T.anchors.tolist())) == 30


def test_mining_is_seeded_and_roundtrips():
    X, _, _ = two_arcs()
    a = manifold_tuples(X, n_tuples=10, n_neg=2, rng=np.random.default_rng(5), **MINE)
    b = manifold_tuples(X, n_tuples=10, n_neg=2, rng=np.random.default_rng(5), **MINE)
    c = manifold_tuples(X, n_tuples=10, n_neg=2, rng=np.random.default_rng(6), **MINE)
    assert np.array_equal(a.as_array(), b.as_array())
    assert not np.array_equal(a.as_array(), c.as_array())
    assert np.array_equal(Tuples.from_array(a.as_array()).as_array(), a.as_array())


def test_too_few_qualifying_anchors_returns_fewer_tuples():
    X, _, _ = two_arcs()
    # negatives drawn from the 4 Euclidean-nearest only: all on the anchor's arc, ranked high by diffusion
    T = manifold_tuples(X, n_tuples=5, n_neg=2, rng=np.random.default_rng(0), **{**MINE, "neg_pool": 4})
    assert len(T) == 0 and T.negatives.shape == (0, 2)
    assert T.stats["few_negatives"] == T.stats["candidates"] == X.shape[0]


def test_random_tuples_baseline():
    X, arc, _ = two_arcs()
    T = random_tuples(X, n_tuples=40, n_neg=3, rng=np.random.default_rng(0), euclid_k=2)
    S = X @ X.T
    for a, p, negs in zip(T.anchors, T.positives, T.negatives):
        nearest = [j for j in np.argsort(-S[a]) if j != a][:2]
        assert p in nearest  # the only label-free positive: a nearest Euclidean neighbour
        assert a not in negs and p not in negs and len(set(negs.tolist())) == 3
    # negatives are not mined: about half of them fall on the anchor's own arc
    same = np.mean(arc[T.negatives] == arc[T.anchors][:, None])
    assert 0.3 < same < 0.7
    assert len(set(T.anchors.tolist())) == 40


def test_mine_tuples_by_name():
    X, _, _ = two_arcs()
    r = mine_tuples("random", X, n_tuples=4, n_neg=1, rng=np.random.default_rng(0), euclid_k=2, pos_k=5)
    assert r.as_array().shape == (4, 3)
    with pytest.raises(ValueError, match="unknown miner"):
        mine_tuples("hardest", X, n_tuples=4, n_neg=1, rng=np.random.default_rng(0))
