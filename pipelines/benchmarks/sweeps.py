"""Sweeps on a finished demo run: PCA-whitening (dims x shrinkage) and graph k x kq for diffusion.

    python -m pipelines.benchmarks.sweeps --run runs/demo

Uses the run's raw features (`features/`, `queries/features/`) for the whitening sweep (kNN mAP)
and its final descriptors for the graph sweeps (diffusion mAP over k x kq, and over alpha). Prints
Markdown tables and writes RUN/sweeps.json, which the run's report shows (re-run `retrieval
evaluate` to refresh report.html).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--gnd", type=Path, default=None, help="ground truth (default: RUN/benchmark/gnd.json)")
    a = ap.parse_args(argv)
    from pipelines.config import QueryConfig
    from pipelines.descriptors import load_descriptors
    from pipelines.evaluate import evaluate_ranks
    from pipelines.groundtruth import read_ground_truth
    from pipelines.rankers import Rankers
    from pipelines.shards import read_json, write_json
    from retrieval.graph import build_graph
    from retrieval.whitening import l2_normalize, learn_pca_whitening

    gt = read_ground_truth(a.gnd or a.run / "benchmark" / "gnd.json")
    _, keys, F = load_descriptors(a.run / "features")
    _, qkeys, QF = load_descriptors(a.run / "queries" / "features")

    def ev(I) -> dict:
        r = evaluate_ranks(I, qkeys, keys, gt)
        return {p: round(r[p]["map"], 2) for p in ("E", "M", "H")}

    def cells(m: dict) -> str:
        return " | ".join(f"{m[p]:.2f}" for p in ("E", "M", "H"))

    def knn_map(X, Q):
        return ev(Rankers(X, QueryConfig()).rank("knn", Q, 0).ids)

    out = {"whitening": [], "graph": [], "alpha": []}
    print("| whitening | dims | shrinkage | E | M | H |\n|---|---|---|---|---|---|")
    m = knn_map(l2_normalize(F), l2_normalize(QF))
    print(f"| none | {F.shape[1]} | - | {cells(m)} |")
    for dim in (32, 64, 128, 256):
        for sh in (0.1, 1.0, 10.0):
            w = learn_pca_whitening(F, dim=dim, shrinkage=sh)
            m = knn_map(w.apply(F), w.apply(QF))
            out["whitening"].append({"dims": w.dim, "shrinkage": sh, **m})
            print(f"| pca | {dim} | {sh} | {cells(m)} |")
    _, _, X = load_descriptors(a.run / "descriptors")
    _, _, Q = load_descriptors(a.run / "queries" / "descriptors")
    print(f"\nkNN on the run's descriptors: {cells(knn_map(X, Q))}\n")
    print("| k | kq | isolated nodes | E | M | H |\n|---|---|---|---|---|---|")
    graphs = {}
    for k in (5, 10, 15, 20, 30, 50):
        W, st = graphs[k] = build_graph(X, k=k)
        for kq in (3, 10):
            m = ev(Rankers(X, QueryConfig(alpha=0.99, kq=kq), W=W).rank("diffusion", Q, 0).ids)  # the query stage's ranker
            out["graph"].append({"k": k, "kq": kq, "isolated": st.isolated, **m})
            print(f"| {k} | {kq} | {st.isolated} | {cells(m)} |")
    k_run = read_json(a.run / "graph" / "manifest.json")["k"] if (a.run / "graph" / "manifest.json").is_file() else 30
    W, _ = graphs.get(k_run) or build_graph(X, k=k_run)
    print(f"\n| alpha (k = {k_run}) | E | M | H |\n|---|---|---|---|")
    for alpha in (0.5, 0.8, 0.9, 0.95, 0.99):
        m = ev(Rankers(X, QueryConfig(alpha=alpha), W=W).rank("diffusion", Q, 0).ids)
        out["alpha"].append({"alpha": alpha, "k": k_run, **m})
        print(f"| {alpha} | {cells(m)} |")
    write_json(out, a.run / "sweeps.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
