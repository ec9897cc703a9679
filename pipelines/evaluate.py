"""Evaluate stage: ranks + ground truth -> metrics.json (mAP in %, Revisited E/M/H or classic)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retrieval.metrics import compute_map, revisited_map

from .config import METHODS, EvaluateConfig  # METHODS: the registry's names, without importing faiss here
from .descriptors import DescriptorError
from .groundtruth import GroundTruth, read_ground_truth
from .shards import read_table, write_json

log = logging.getLogger(__name__)


def _name_index(names: list[str]) -> dict[str, int]:
    idx = {}
    for i, n in enumerate(names):
        idx[n] = i
        idx.setdefault(str(Path(n).with_suffix("")), i)
    return idx


def _lookup(index: dict[str, int], key: str) -> int | None:
    if not key:
        return None
    for cand in (key, str(Path(key).with_suffix("")), Path(key).stem):
        if cand in index:
            return index[cand]
    return None


def to_gnd_ranks(ranked_ids: np.ndarray, db_keys: list[str], gt: GroundTruth) -> np.ndarray:
    """(nq, K) database ids -> (K, nq) indices into gt.imlist (unknown items get indices >= len).

    db_keys[i] is the key of image id i ("" for ids without a descriptor)."""
    index = _name_index(gt.imlist)
    m = len(gt.imlist)
    id_to_gnd = np.array([(_lookup(index, k) if _lookup(index, k) is not None else m + i) for i, k in enumerate(db_keys)], dtype=np.int64)
    return id_to_gnd[ranked_ids].T


def evaluate_ranks(ranked_ids: np.ndarray, query_keys: list[str], db_keys: list[str], gt: GroundTruth, kappas=(1, 5, 10)) -> dict:
    """mAP/mP@k (percent) for one method; queries are matched to gt.qimlist by key."""
    qindex = _name_index(gt.qimlist)
    qpos = [_lookup(qindex, k) for k in query_keys]
    if any(p is None for p in qpos):
        missing = [k for k, p in zip(query_keys, qpos) if p is None][:5]
        raise ValueError(f"evaluate: queries not in the ground truth: {missing}")
    gnd = [gt.gnd[p] for p in qpos]
    ranks = to_gnd_ranks(ranked_ids, db_keys, gt)
    if gt.protocol == "revisited":
        res = revisited_map(ranks, gnd, kappas)
        return {p: {"map": 100 * r.map, "mpk": {int(k): 100 * float(v) for k, v in zip(kappas, r.mpk)}, "aps": (100 * r.aps).tolist()} for p, r in res.items()}
    r = compute_map(ranks, gnd, kappas)
    return {"classic": {"map": 100 * r.map, "mpk": {int(k): 100 * float(v) for k, v in zip(kappas, r.mpk)}, "aps": (100 * r.aps).tolist()}}


def _check_ranked_ids(ids: np.ndarray, db_keys: list[str], path: Path) -> None:
    """Every ranked id must name a database descriptor: ranks made before descriptors/ changed (a
    shard deleted, a new extraction or import) would otherwise be scored against the wrong images."""
    known = np.array([bool(k) for k in db_keys] + [False], bool)  # the extra slot stands for every id out of range
    flat = ids.ravel()
    flat = flat[flat >= 0]  # (negative ids are padding, not database images)
    bad = flat[~known[np.minimum(flat, len(db_keys))]]
    if bad.size:
        raise DescriptorError(
            f"evaluate: {path.name} ranks {np.unique(bad).size} database id(s) that descriptors/ lacks (e.g. {np.unique(bad)[:5].tolist()}): "
            "the descriptors changed after the query stage (a shard deleted or rewritten); rerun `retrieval extract` to rebuild "
            "the missing descriptor shards (or re-import them), then `graph` and `query`")


def run_evaluate(run_dir: Path, gnd_path: Path, cfg: EvaluateConfig, *, db_keys: list[str], methods: list[str] | None = None) -> dict:
    """Evaluate `ranks/<method>.parquet` for `methods` (default: every ranks file); writes
    metrics.json ({method: {E, M, H}}) and evaluation.json."""
    gt = read_ground_truth(gnd_path)
    metrics, detail = {}, {}
    order = {m: i for i, m in enumerate(METHODS)}
    paths = sorted((run_dir / "ranks").glob("*.parquet"), key=lambda p: (order.get(p.stem, len(order)), p.stem))
    for path in [p for p in paths if methods is None or p.stem in methods]:
        t = read_table(path, ["query", "ids"])
        qkeys = t.column("query").to_pylist()
        ids = np.array(t.column("ids").to_pylist(), dtype=np.int64)
        _check_ranked_ids(ids, db_keys, path)
        res = evaluate_ranks(ids, qkeys, db_keys, gt, cfg.kappas)
        metrics[path.stem] = {p: round(v["map"], 2) for p, v in res.items()}
        detail[path.stem] = res
    if not metrics:
        raise FileNotFoundError(f"evaluate: no ranks in {run_dir / 'ranks'}; run `retrieval query` first")
    write_json(metrics, run_dir / "metrics.json")
    write_json({"ground_truth": str(gnd_path), "protocol": gt.protocol, "methods": detail}, run_dir / "evaluation.json")
    return metrics


def format_table(metrics: dict) -> str:
    cols = list(next(iter(metrics.values())).keys())
    lines = [f"{'method':<12}" + "".join(f"{c:>10}" for c in cols)]
    for m, v in metrics.items():
        lines.append(f"{m:<12}" + "".join(f"{v[c]:>10.2f}" for c in cols))
    return "\n".join(lines)
