"""Pooling x scales x whitening on the synthetic benchmark (kNN mAP, Revisited E/M/H).

    python -m pipelines.benchmarks.pooling --config deploy/configs/demo.toml --out runs/pooling

Reuses the image shards of the demo run (run `make demo` first, or it ingests them), extracts raw
features once per (pooling, scales) with the in-process engine, then applies each whitening
(none, PCA, learned on mutual-NN pairs) and ranks the test landmarks' queries by kNN. Writes
`OUT/results.json` and `OUT/RESULTS.md`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path


log = logging.getLogger("pooling")
POOLINGS = ["mac", "spoc", "gem", "rmac", "crow", "fs"]
SCALES = {"single": [1.0], "multi": [1.0, 0.7071, 0.5]}
WHITENINGS = ["none", "pca", "lw"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/configs/demo.toml")
    ap.add_argument("--out", type=Path, default=Path("runs/pooling"))
    ap.add_argument("--poolings", nargs="+", default=POOLINGS)
    ap.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    a = ap.parse_args(argv)
    from pipelines.benchmarks import ingested_run
    from pipelines.descriptors import load_descriptors
    from pipelines.evaluate import evaluate_ranks
    from pipelines.extract import extract_features, finalize_descriptors
    from pipelines.config import QueryConfig
    from pipelines.groundtruth import read_ground_truth
    from pipelines.rankers import Rankers

    cfg, base = ingested_run(a.config)
    gt = read_ground_truth(cfg.dataset.gnd)
    results = {}
    for pooling in a.poolings:
        for sname in a.scales:
            ecfg = dataclasses.replace(cfg.extract, pooling=pooling, scales=SCALES[sname], engine="local")
            run = a.out / f"{pooling}-{sname}"
            for sub in ("images", "queries/images"):
                dst = run / sub
                if not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copytree(base / sub, dst)
            t0 = time.perf_counter()
            extract_features(run / "images", run, ecfg)
            extract_features(run / "queries" / "images", run / "queries", ecfg, with_boxes=True)
            t_ex = time.perf_counter() - t0
            for wname in WHITENINGS:
                wcfg = dataclasses.replace(ecfg, whitening=wname)
                man = finalize_descriptors(run, wcfg, learn=True)
                from pipelines.extract import load_whitening

                w = load_whitening(run / "whitening.npz") if wname != "none" else None
                finalize_descriptors(run / "queries", wcfg, whitening=w, learn=False)
                _, db_keys, X = load_descriptors(run / "descriptors")
                _, qkeys, Q = load_descriptors(run / "queries" / "descriptors")
                res = evaluate_ranks(Rankers(X, QueryConfig()).rank("knn", Q, 0).ids, qkeys, db_keys, gt)
                key = f"{pooling}/{sname}/{wname}"
                results[key] = {p: round(v["map"], 2) for p, v in res.items()} | {"extract_seconds": round(t_ex, 1), "dim": man["dim"]}
                log.info("%-22s %s", key, results[key])
            (a.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| pooling | scales | whitening | E | M | H |", "|---|---|---|---|---|---|"]
    for key, v in results.items():
        p, s, w = key.split("/")
        lines.append(f"| {p} | {s} | {w} | {v['E']:.2f} | {v['M']:.2f} | {v['H']:.2f} |")
    (a.out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
