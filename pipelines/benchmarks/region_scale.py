"""Region graph at scale: n images x r regions (default 10^5 x 10 = 10^6 region nodes) through the
product's region index (pipelines.regions.run_region_graph: shard-by-shard reading, regional
whitening, the graph stage's own kNN graph), against the targets the global graph met at 10^6
(under 3 minutes, recall 0.95, under 8 GiB).

    python -m pipelines.benchmarks.region_scale --images 100000 --regions 10 --out runs/region-scale

Feature shards are written first, their `regions` column holding synthetic manifold points
(retrieval.synthetic_manifold, 128-d, shuffled so that an image's regions lie on different
manifolds, as the regions of one photo show different things); then the region index is built in a
child process whose wall time and peak RSS are measured. Writes OUT/results.json and OUT/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.logs import setup_logging

log = logging.getLogger("region_scale")


def write_features(out: Path, images: int, regions: int, *, dim: int, shard_images: int, seed: int) -> None:
    from pipelines.descriptors import write_descriptors
    from retrieval.synthetic_manifold import ManifoldSpec, make_manifold_dataset

    X, *_ = make_manifold_dataset(ManifoldSpec(n=images * regions, d=dim, n_queries=1, seed=seed))
    X = X[np.random.default_rng(seed).permutation(len(X))].reshape(images, regions, dim)
    for s, a in enumerate(range(0, images, shard_images)):
        b = min(a + shard_images, images)
        R = X[a:b]
        G = R.sum(axis=1)
        write_descriptors(out / "features" / f"part-{s:05d}.parquet", np.arange(a, b), [f"img{i:07d}" for i in range(a, b)],
                          G / np.linalg.norm(G, axis=1, keepdims=True), params="synthetic",
                          regions={"regions": list(R), "region_boxes": [np.zeros((regions, 4), np.float32)] * (b - a)})


def build_index(out: Path, index: str) -> dict:
    """The product's region index over OUT/features (run in the measured child process)."""
    from pipelines.config import ExtractConfig, GraphConfig
    from pipelines.peak_memory import own_peak_gib
    from pipelines.regions import run_region_graph

    t0 = time.perf_counter()
    man = run_region_graph(out, GraphConfig(k=50, index=index), ExtractConfig(whitening_dim=0, whitening_shrinkage=1.0),
                           features="synthetic")
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": own_peak_gib(), "manifest": man}


def query_step(out: Path, queries: int, solvers: list[str], *, petsc_ranks: int = 2, seed: int = 1) -> dict:
    """Regional diffusion for `queries` region-set queries (an image's regions, jittered) through the
    product's rankers, once per `[query] region_solver`: ranker build and ranking seconds, and each
    solver's top-10 images against the first solver's (the reference)."""
    from pipelines.config import QueryConfig
    from pipelines.rankers import Rankers
    from pipelines.regions import load_region_index

    idx = load_region_index(out, graph=False)
    starts = np.searchsorted(idx.owner, np.arange(len(idx.ids) + 1))
    G = np.add.reduceat(idx.V, starts[:-1], axis=0)  # the images' own vectors: the rankers need some (n, d) database
    X = (G / np.linalg.norm(G, axis=1, keepdims=True)).astype(np.float32)
    rng = np.random.default_rng(seed)
    regions = []
    for i in rng.choice(len(idx.ids), queries, replace=False):
        R = idx.V[starts[i] : starts[i + 1]] + 0.02 * rng.normal(size=(starts[i + 1] - starts[i], idx.V.shape[1]))
        regions.append((R / np.linalg.norm(R, axis=1, keepdims=True)).astype(np.float32))
    res: dict = {"queries": queries, "region_nodes": int(len(idx.V)), "solvers": {}}
    ref = None
    for solver in solvers:
        cfg = QueryConfig(methods=["regional"], kq=10, region_solver=solver, petsc_ranks=petsc_ranks, truncate_m=2000, rtol=1e-6)
        rk = Rankers(X, cfg, graph_dir=out / "graph")
        t0 = time.perf_counter()
        rk.get("regional")
        t1 = time.perf_counter()
        r = rk.rank("regional", X[:queries], 100, regions=regions)
        t2 = time.perf_counter()
        top = r.ids[:, :10]
        ref = top if ref is None else ref
        res["solvers"][solver] = {"build_s": t1 - t0, "rank_s": t2 - t1, "ms_per_query": 1e3 * (t2 - t1) / queries,
                                  "top10_agreement": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, ref)])),
                                  "iterations_mean": float(np.mean(r.stats.iterations)), "converged": int(r.stats.converged.sum())}
        log.info("regional, %s: build %.1f s, %.1f ms/query, top-10 agreement with %s %.3f", solver, t1 - t0,
                 res["solvers"][solver]["ms_per_query"], solvers[0], res["solvers"][solver]["top10_agreement"])
        del rk
    return res


def build_and_measure(a: argparse.Namespace) -> None:
    """Feature shards (once), then the region index built in a measured child process: OUT/results.json and OUT/RESULTS.md."""
    if not (a.out / "features").is_dir():
        t0 = time.perf_counter()
        write_features(a.out, a.images, a.regions, dim=a.dim, shard_images=a.shard_images, seed=0)
        log.info("features: %d images x %d regions written in %.1f s", a.images, a.regions, time.perf_counter() - t0)
    t0 = time.perf_counter()
    child = subprocess.run([sys.executable, "-m", "pipelines.benchmarks.region_scale", "--child", "--out", str(a.out),
                            "--index", a.index], check=True, capture_output=True, text=True)
    res = json.loads(child.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    man = res["manifest"]
    res["row"] = {"images": a.images, "regions": man["regions"], "index": man["graph"]["index"], "recall": round(man["graph"]["recall_at_k"], 3) if man["graph"].get("recall_at_k") is not None else None,
                  "index_s": round(res["seconds"], 1), "graph_s": round(man["graph"]["seconds"], 1),
                  "peak_rss_gib": round(res["peak_rss_gib"], 2), "nnz": man["graph_nnz"], "isolated": man["graph_isolated"]}
    (a.out / "results.json").write_text(json.dumps(res, indent=2))
    r = res["row"]
    table = ("| images | region nodes | index | region index s (graph s) | recall@51 | peak RSS GiB | edges | isolated |\n"
             "|---|---|---|---|---|---|---|---|\n"
             f"| {r['images']:,} | {r['regions']:,} | {r['index']} | {r['index_s']} ({r['graph_s']}) | {r['recall']} | {r['peak_rss_gib']} | "
             f"{r['nnz']:,} | {r['isolated']:,} |\n")
    (a.out / "RESULTS.md").write_text(table)
    print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--regions", type=int, default=10)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--index", default="auto", choices=["auto", "flat", "hnsw", "ivf"])
    ap.add_argument("--shard-images", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path("runs/region-scale"))
    ap.add_argument("--queries", type=int, default=0, help="then rank this many region-set queries with each --solvers")
    ap.add_argument("--solvers", nargs="+", default=["exact", "truncated", "petsc"], help="[query] region_solver values, the first the reference")
    ap.add_argument("--query-only", action="store_true", help="rank on the region index already in OUT")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    setup_logging()
    if a.child:
        print(json.dumps(build_index(a.out, a.index)))
        return 0
    if not a.query_only:
        build_and_measure(a)
    if a.queries:
        res = query_step(a.out, a.queries, a.solvers)
        (a.out / "query-results.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
