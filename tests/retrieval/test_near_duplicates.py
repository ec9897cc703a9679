"""Near-duplicate groups: range-search pairs against numpy, chains that link unlike rows, sets around a centre."""
import numpy as np
import pytest

from retrieval import near_duplicates as nd
from retrieval.whitening import l2_normalize


def test_pairs_equal_numpy_brute_force(rng, monkeypatch):
    monkeypatch.setattr(nd, "RANGE_BLOCK", 64)  # several range searches, their rows offset
    X = l2_normalize(rng.normal(size=(300, 6))).astype(np.float32)
    A = nd.similar_pairs(X, 0.8)
    S = X @ X.T
    ref = (S > 0.8) & ~np.eye(len(X), dtype=bool)
    far = np.abs(S - 0.8) > 1e-5  # pairs on the threshold itself may fall either side of it
    assert (A.toarray() == ref)[far].all() and ref.sum() > 100
    assert (A != A.T).nnz == 0


def _arc(n: int, step: float) -> np.ndarray:
    t = np.arange(n) * step
    return np.stack([np.cos(t), np.sin(t)], 1).astype(np.float32)


def test_a_chain_is_one_linked_group_but_several_centred_sets():
    X = _arc(40, 0.1)  # neighbours 0.995 alike, the ends cos(3.9) = -0.73
    A = nd.similar_pairs(X, 0.95)  # pairs up to 3 steps apart
    linked, centred = nd.linked_groups(A), nd.centred_groups(A)
    assert nd.group_summary(linked) == {"groups": 1, "largest": 40, "in_groups": 1.0, "distinct": 1}
    s = nd.group_summary(centred)
    assert 6 <= s["groups"] <= 10 and s["largest"] <= 7 and s["in_groups"] >= 0.95  # a last row may be left alone
    spread = nd.pairwise_spread(X, np.arange(40), 0.95)
    assert spread["min"] < -0.7 and spread["share_above"] < 0.2


def test_centred_sets_keep_a_family_whole_and_every_member_near_its_centre(rng):
    base = l2_normalize(rng.normal(size=(1, 32)))
    family = l2_normalize(base + 0.03 * rng.normal(size=(25, 32)))
    others = l2_normalize(rng.normal(size=(500, 32)))
    X = np.concatenate([others[:200], family, others[200:]]).astype(np.float32)
    A = nd.similar_pairs(X, 0.95)
    labels = nd.centred_groups(A)
    fam = labels[200:225]
    assert len(set(fam)) == 1 and (labels == fam[0]).sum() == 25
    s = nd.group_summary(labels)
    assert s["groups"] == 1 and s["largest"] == 25 and s["distinct"] == 500 + 1
    # every member of every set is paired with the set's centre (the member with the most pairs)
    for g in np.unique(labels):
        m = np.flatnonzero(labels == g)
        if len(m) > 1:
            deg = np.diff(A.indptr)[m]
            centre = m[np.argmax(deg)]
            assert all(A[centre, j] for j in m if j != centre)


def test_centred_sets_partition_random_rows(rng):
    X = l2_normalize(rng.normal(size=(400, 4))).astype(np.float32)
    A = nd.similar_pairs(X, 0.9)
    labels = nd.centred_groups(A)
    assert labels.shape == (400,) and labels.min() == 0
    assert len(np.unique(labels)) == labels.max() + 1  # labels 0..groups-1, each row in exactly one
    assert nd.group_summary(labels)["distinct"] < 400 < A.nnz


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_rows(n):
    X = np.ones((n, 3), np.float32) / np.sqrt(3)
    A = nd.similar_pairs(X, 0.5)
    assert A.shape == (n, n) and A.nnz == 0
    assert len(nd.centred_groups(A)) == n
    assert nd.pairwise_spread(X, np.arange(n), 0.5) == {}
