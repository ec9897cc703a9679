from pathlib import Path

import pytest

from pipelines.groundtruth import read_ground_truth

from tests.conftest import SHARED_DATA as DATA


def _need(name):
    p = DATA / name
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p


def test_revisited_pkl():
    gt = read_ground_truth(_need("gnd_roxford5k.pkl"))
    assert gt.protocol == "revisited" and len(gt.imlist) == 4993 and len(gt.qimlist) == 70
    assert set(gt.gnd[0]) >= {"easy", "hard", "junk", "bbx"}
    gt = read_ground_truth(_need("gnd_rparis6k.pkl"))
    assert len(gt.imlist) == 6322 and len(gt.qimlist) == 70


def test_classic_mat_is_zero_based():
    gt = read_ground_truth(_need("gnd_oxford5k.mat"))
    assert gt.protocol == "classic" and len(gt.imlist) == 5062 and len(gt.qimlist) == 55
    assert gt.qimlist[0] == "all_souls_000013"
    rox = read_ground_truth(_need("gnd_roxford5k.pkl"))
    pos = {rox.imlist[i] for i in rox.gnd[0]["easy"] + rox.gnd[0]["hard"] + rox.gnd[0]["junk"]}
    hits = sum(gt.imlist[i] in pos for i in gt.gnd[0]["ok"])
    assert hits >= 0.8 * len(gt.gnd[0]["ok"])  # same landmark's positives under both protocols
    hol = read_ground_truth(_need("gnd_holidays.mat"))
    assert hol.qimlist[0] == "100000" and [hol.imlist[i] for i in hol.gnd[0]["ok"]] == ["100001", "100002"]
    assert [hol.imlist[i] for i in hol.gnd[0]["junk"]] == ["100000"]
    ins = read_ground_truth(_need("gnd_instre.mat"))
    assert len(ins.qimlist) == 1250 and ins.gnd[0]["junk"] == []


def test_unsafe_pickle_refused(tmp_path):
    import pickle

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"imlist": [Path("x")], "qimlist": [], "gnd": []}))
    with pytest.raises(pickle.UnpicklingError, match="only plain data"):
        read_ground_truth(p)
    with pytest.raises(ValueError, match="unsupported format"):
        csv = tmp_path / "g.csv"
        csv.write_text("a,b")
        read_ground_truth(csv)


def test_classic_evaluation_on_official_structure():
    import numpy as np

    from pipelines.evaluate import evaluate_ranks

    gt = read_ground_truth(_need("gnd_oxford5k.mat"))
    keys = [f"{n}.jpg" for n in gt.imlist]
    qkeys = gt.qimlist[:3]
    ranked = []
    for q in range(3):
        ok = gt.gnd[q]["ok"]
        ranked.append(np.concatenate([ok, np.setdiff1d(np.arange(len(keys)), ok)]))
    res = evaluate_ranks(np.array(ranked), qkeys, keys, gt)
    assert res["classic"]["map"] == pytest.approx(100.0)
    assert res["classic"]["mpk"][1] == pytest.approx(100.0)
