import numpy as np
import pytest

from retrieval.metrics import compute_ap, compute_map, positive_positions, revisited_gnd, revisited_map

from tests.conftest import SHARED_DATA as DATA


def test_ap_hand_computed():
    # positives at ranks 0 and 2 of 2: 0.5 * (1 + 1) / 2 + 0.5 * (1/2 + 2/3) / 2
    assert compute_ap(np.array([0, 2]), 2) == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2)
    assert compute_ap(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    assert compute_ap(np.array([0]), 3) == pytest.approx(1 / 3)  # positives never retrieved count as 0
    # single positive at rank 4: trapezoid of 0/4 and 1/5
    assert compute_ap(np.array([4]), 1) == pytest.approx((0 + 1 / 5) / 2)


def test_junk_is_removed_before_ranking():
    ranking = np.array([10, 11, 12, 13])
    pos = positive_positions(ranking, positives=np.array([10, 12]), junk=np.array([11]))
    np.testing.assert_array_equal(pos, [0, 1])


def _official_compute_map(ranks, gnd, kappas):
    """Loop transcription of the official revisitop `compute_map` (reference for the tests)."""
    mAP, nq, nempty = 0.0, len(gnd), 0
    pr = np.zeros(len(kappas))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(gnd[i].get("junk", []))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = 0.0
        for j, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else j / rank
            ap += (p0 + (j + 1) / (rank + 1)) / (2 * len(qgnd))
        mAP += ap
        pos = pos + 1
        for j, kk in enumerate(kappas):
            kq = min(max(pos), kk)
            pr[j] += (pos <= kq).sum() / kq
    return mAP / (nq - nempty), pr / (nq - nempty)


@pytest.fixture(scope="module")
def roxford():
    path = DATA / "gnd_roxford5k.pkl"
    if not path.is_file():
        pytest.skip("shared/data/gnd_roxford5k.pkl not present")
    from pipelines.groundtruth import read_revisited_pkl

    return read_revisited_pkl(path)


def test_matches_official_definition_on_roxford_gnd(roxford):
    rng = np.random.default_rng(0)
    n, nq = len(roxford.imlist), len(roxford.qimlist)
    ranks = np.stack([rng.permutation(n) for _ in range(nq)], axis=1)
    # move positives up a bit so APs are not all tiny
    for i, g in enumerate(roxford.gnd):
        good = np.array(g["easy"] + g["hard"])
        col = ranks[:, i]
        up = good[rng.permutation(good.size)][: good.size // 2]
        ranks[:, i] = np.concatenate([up, col[~np.isin(col, up)]])
    for p in ("E", "M", "H"):
        g = revisited_gnd(roxford.gnd, p)
        res = compute_map(ranks, g, (1, 5, 10))
        ref_map, ref_pr = _official_compute_map(ranks, g, (1, 5, 10))
        assert res.map == pytest.approx(ref_map, rel=1e-12)
        np.testing.assert_allclose(res.mpk, ref_pr, rtol=1e-12)


def test_perfect_ranking_scores_100_on_every_protocol(roxford):
    n = len(roxford.imlist)
    cols = []
    for g in roxford.gnd:
        first = g["easy"] + g["hard"]
        rest = np.setdiff1d(np.arange(n), first)
        # easy before hard: Hard protocol treats easy as junk, Easy treats hard as junk
        cols.append(np.concatenate([g["easy"], g["hard"], rest]))
    res = revisited_map(np.stack(cols, axis=1), roxford.gnd)
    for p in ("E", "M", "H"):
        assert res[p].map == pytest.approx(1.0)


def test_query_without_positives_is_excluded():
    ranks = np.array([[0, 0], [1, 1], [2, 2]])
    res = compute_map(ranks, [{"ok": [0], "junk": []}, {"ok": [], "junk": []}])
    assert res.map == pytest.approx(1.0) and np.isnan(res.aps[1])


def test_shape_is_checked():
    with pytest.raises(ValueError, match="ranks must be"):
        compute_map(np.zeros((3, 1), dtype=int), [{"ok": [0]}, {"ok": [1]}])


def test_precision_recall_curve_by_hand():
    from retrieval.metrics import precision_recall_curve

    # positives 1 and 3 of 2; item 9 is junk and removed: ranking 9,1,5,3 -> 1 at 0, 3 at 2
    ranks = np.array([[9, 1, 5, 3], [7, 8, 0, 2]])
    gnd = [{"ok": [1, 3], "junk": [9]}, {"ok": [4], "junk": []}]
    levels, prec = precision_recall_curve(ranks, gnd, np.array([0.0, 0.5, 1.0]))
    # query 0: recall 0.5 at precision 1, recall 1 at precision 2/3; query 1 never finds its positive
    np.testing.assert_allclose(prec, [(1.0 + 0) / 2, (1.0 + 0) / 2, (2 / 3 + 0) / 2])
    assert levels.tolist() == [0.0, 0.5, 1.0]
