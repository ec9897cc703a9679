"""Sweeps on a finished demo run: PCA-whitening (dims x shrinkage) and graph k x kq for diffusion.

    python -m pipelines.benchmarks.sweeps --run runs/demo

Uses the run's raw features (`features/`, `queries/features/`) for the whitening sweep (kNN mAP)
and its final descriptors for the graph sweep (diffusion mAP). Prints Markdown tables.
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
    from retrieval.graph import build_graph
    from retrieval.whitening import l2_normalize, learn_pca_whitening

    gt = read_ground_truth(a.gnd or a.run / "benchmark" / "gnd.json")
    _, keys, F = load_descriptors(a.run / "features")
    _, qkeys, QF = load_descriptors(a.run / "queries" / "features")

    def ev(I):
        r = evaluate_ranks(I, qkeys, keys, gt)
        return " | ".join(f"{r[p]['map']:.2f}" for p in ("E", "M", "H"))

    def knn_map(X, Q):
        return ev(Rankers(X, QueryConfig()).rank("knn", Q, 0).ids)

    print("| whitening | dims | shrinkage | E | M | H |\n|---|---|---|---|---|---|")
    print(f"| none | {F.shape[1]} | - | {knn_map(l2_normalize(F), l2_normalize(QF))} |")
    for dim in (32, 64, 128, 256):
        for sh in (0.1, 1.0, 10.0):
            w = learn_pca_whitening(F, dim=dim, shrinkage=sh)
            print(f"| pca | {dim} | {sh} | {knn_map(w.apply(F), w.apply(QF))} |")
    _, _, X = load_descriptors(a.run / "descriptors")
    _, _, Q = load_descriptors(a.run / "queries" / "descriptors")
    print(f"\nkNN on the run's descriptors: {knn_map(X, Q)}\n")
    print("| k | kq | isolated nodes | E | M | H |\n|---|---|---|---|---|---|")
    for k in (5, 10, 15, 20, 30, 50):
        W, st = build_graph(X, k=k)
        for kq in (3, 10):
            ranking = Rankers(X, QueryConfig(alpha=0.99, kq=kq), W=W).rank("diffusion", Q, 0)  # the query stage's ranker
            print(f"| {k} | {kq} | {st.isolated} | {ev(ranking.ids)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
