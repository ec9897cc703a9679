"""Scale experiment for graph construction and diffusion on synthetic descriptor manifolds.

    python -m pipelines.benchmarks.scale --n 10000 100000 --out runs/scale

For each N: builds the data (cached), the graph with an exact and/or approximate index (each in
its own process so its peak memory is its own), then ranks 1,000 planted queries with every
method through the product's graph stage and rankers (kNN, alpha-QE, block CG, truncated
diffusion, spectral ranking, PETSc with 1 and 2 ranks; a loop of scipy `cg` as a reference),
reporting build and ranking time, queries/s, mAP and CG statistics, and the memory-bandwidth bound of the sparse products. Results: `OUT/N/*.json` and `OUT/RESULTS.md`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.peak_memory import own_peak_gib

from .spmm import spmm_bound, step_spmm

log = logging.getLogger("scale")


def _spec(n: int, nq: int):
    from retrieval.synthetic_manifold import ManifoldSpec

    return ManifoldSpec(n=n, n_queries=nq, shared_dim=32, seed=0)


def step_gen(out: Path, n: int, nq: int) -> dict:
    from retrieval.synthetic_manifold import make_manifold_dataset

    t0 = time.perf_counter()
    X, lab, Q, ql = make_manifold_dataset(_spec(n, nq))
    np.save(out / "X.npy", X)
    np.save(out / "labels.npy", lab)
    np.save(out / "Q.npy", Q)
    np.save(out / "qlabels.npy", ql)
    return {"seconds": time.perf_counter() - t0, "n": n, "d": int(X.shape[1]), "queries": nq,
            "classes": int(lab.max() + 1), "distractors": int((lab < 0).sum())}


def step_graph(out: Path, index: str, k: int, nprobe: int, nlist: int, hnsw_m: int = 32, ef_construction: int = 80,
               ef_search: int = 128) -> dict:
    """The graph stage's own build (`pipelines.graph.build_graph_sharded`), written as the stage
    writes it (row blocks in OUT/graph-INDEX, which the rankers and the PETSc ranks read)."""
    from pipelines.config import GraphConfig
    from pipelines.graph import build_graph_sharded, write_graph

    X = np.load(out / "X.npy")
    n = X.shape[0]
    cfg = GraphConfig(k=k, index=index, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_construction=ef_construction,
                      ef_search=ef_search, shards=max(1, n // 50_000), engine="local", recall_sample=1000)
    W, st, info = build_graph_sharded(X, cfg)  # an approximate index's recall@k is measured by the stage on 1,000 rows
    write_graph(W, out / f"graph-{index}", block_rows=GraphConfig().block_rows, manifest={"n": n, "nnz": int(W.nnz), "k": k})
    return {"index": info["index"], "nlist": info["nlist"], "nprobe": info["nprobe"], "hnsw": info["hnsw"],
            "k": k, "seconds_index": info["seconds_index"], "seconds_search": info["seconds_search"], "seconds_total": info["seconds"],
            "recall_at_k": info.get("recall_at_k", 1.0), "nnz": int(W.nnz), "isolated": st.isolated, "peak_rss_gib": own_peak_gib()}


def step_recall(out: Path, nlists: list[int], nprobes: list[int], rows: int = 1000) -> dict:
    """IVF recall@k on `rows` sampled rows against exact search, per (nlist, nprobe), with the
    self-kNN time of all N rows projected from the sample's search time."""
    from retrieval.knn import IndexSpec, build_index, knn_search, recall_at_k, search_index

    X = np.load(out / "X.npy")
    sel = np.sort(np.random.default_rng(1).choice(len(X), min(rows, len(X)), replace=False))
    _, Iref = knn_search(X[sel], X, 51)
    res = []
    for nlist in nlists:
        t0 = time.perf_counter()
        idx = build_index(X, IndexSpec("ivf", nlist=nlist))
        tb = time.perf_counter() - t0
        for nprobe in nprobes:
            idx.nprobe = nprobe
            t0 = time.perf_counter()
            _, I = search_index(idx, X[sel], 51)
            ts = time.perf_counter() - t0
            res.append({"nlist": nlist, "nprobe": nprobe, "build_seconds": tb, "recall_at_51": recall_at_k(I, Iref),
                        "projected_search_seconds": ts * len(X) / len(sel)})
            log.info("nlist %d nprobe %d: recall %.4f, projected %.0f s", nlist, nprobe, res[-1]["recall_at_51"], res[-1]["projected_search_seconds"])
    return {"sweep": res}


def step_recall_hnsw(out: Path, ef_searches: list[int], rows: int = 1000) -> dict:
    """HNSW recall@51 on sampled rows against exact search for (M, efConstruction) in
    {(16, 40), (32, 80)} x efSearch, with the self-kNN time of all N rows projected."""
    from retrieval.knn import IndexSpec, build_index, knn_search, recall_at_k, search_index

    X = np.load(out / "X.npy")
    sel = np.sort(np.random.default_rng(1).choice(len(X), min(rows, len(X)), replace=False))
    _, Iref = knn_search(X[sel], X, 51)
    res = []
    for m, efc in ((16, 40), (32, 80)):
        t0 = time.perf_counter()
        idx = build_index(X, IndexSpec("hnsw", hnsw_m=m, ef_construction=efc))
        tb = time.perf_counter() - t0
        for ef in ef_searches:
            idx.hnsw.efSearch = ef
            t0 = time.perf_counter()
            _, I = search_index(idx, X[sel], 51)
            ts = time.perf_counter() - t0
            res.append({"M": m, "efConstruction": efc, "efSearch": ef, "build_seconds": tb, "recall_at_51": recall_at_k(I, Iref),
                        "projected_search_seconds": ts * len(X) / len(sel)})
            log.info("M %d efC %d efSearch %d: build %.1f s, recall %.4f, projected search %.1f s", m, efc, ef, tb,
                     res[-1]["recall_at_51"], res[-1]["projected_search_seconds"])
    return {"sweep": res}


def step_methods(out: Path, graph: str, nq: int, topk: int, loop_queries: int, petsc_queries: int, spectral_rank: int,
                 truncate_m: int, methods: list[str], truncate_hops: int = 8, truncate_beam: int = 0, exact_queries: int = 0) -> dict:
    """Every method ranked through the product's rankers (`pipelines.rankers.Rankers`, built from a
    `QueryConfig` as the query stage builds them), timing the build (offline) and the ranking."""
    from pipelines.config import QueryConfig
    from pipelines.graph import load_graph
    from pipelines.rankers import Rankers
    from retrieval.diffusion import diffusion_operator, query_vectors, scipy_cg, topk_columns
    from retrieval.metrics import compute_map
    from retrieval.synthetic_manifold import positives

    X, Q = np.load(out / "X.npy"), np.load(out / "Q.npy")[:nq]
    gnd = [{"ok": p} for p in positives(np.load(out / "labels.npy"), np.load(out / "qlabels.npy")[:nq])]
    gdir = out / f"graph-{graph}"
    W, _ = load_graph(gdir)
    n = X.shape[0]
    base = QueryConfig(alpha=0.99, gamma=3.0, kq=10, rtol=1e-6, maxiter=100, aqe_n=2, aqe_alpha=3.0, batch=128,
                       truncate_m=truncate_m, truncate_hops=truncate_hops, truncate_beam=truncate_beam, spectral_rank=spectral_rank)
    nexact = min(exact_queries, nq) if exact_queries > 0 else nq
    res: dict = {"graph": graph, "queries": nq, "topk": topk, "subset": min(loop_queries, petsc_queries, nexact, nq)}
    nsub = res["subset"]

    def record(name, ids, seconds, nqueries, **extra):
        ids = np.asarray(ids)
        m = compute_map(ids.T, gnd[: len(ids)]).map * 100
        msub = compute_map(ids[:nsub].T, gnd[:nsub]).map * 100  # same queries for every method
        res[name] = {"seconds": seconds, "queries": nqueries, "queries_per_s": nqueries / seconds, "map": m, "map_subset": msub, **extra}
        log.info("%-22s %8.2f s %9.1f q/s  mAP %.2f (first %d: %.2f)", name, seconds, nqueries / seconds, m, nsub, msub)

    def run(label: str, method: str, cfg: QueryConfig, m: int) -> None:
        rankers = Rankers(X, cfg, W=W, graph_dir=gdir if method in ("petsc", "spectral") else None)  # spectral: cached in graph-*/
        t0 = time.perf_counter()
        rankers.get(method)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = rankers.rank(method, Q[:m], topk)
        extra = {"build_seconds": t_build}
        if r.stats is not None:
            extra.update(iterations_mean=float(r.stats.iterations.mean()), not_converged=int((~r.stats.converged).sum()),
                         residual_max=float(r.stats.residuals.max()))
        if method == "spectral":
            emb = rankers.get("spectral").emb
            extra.update(offline_seconds=t_build, offline_bytes=int(emb.V.nbytes + emb.U.nbytes))
        record(label, r.ids, time.perf_counter() - t0, m, **extra)

    run("knn (exact)", "knn", base, nq)
    if "aqe" in methods:
        run("alpha-QE", "aqe", base, nq)
    for name, label, over, m in (
            ("cg-float64", "block CG float64", {}, nexact),
            ("cg-float32", "block CG float32", {"dtype": "float32", "rtol": 1e-5}, nexact),
            ("cg-float64-scipy", "block CG float64 (plain scipy product)", {"matmul": "scipy"}, min(loop_queries, nq)),
            ("truncated", f"truncated (m={truncate_m})", {"truncate_select": "bfs"}, nq),
            ("truncated-mass", f"truncated, mass selection (m={truncate_m}, {truncate_hops} hops, beam {truncate_beam or truncate_m})",
             {"truncate_select": "mass"}, nq),
            ("spectral", f"spectral (r={spectral_rank})", {}, nq),
            ("petsc1", "PETSc CG 1 rank", {"petsc_ranks": 1}, min(petsc_queries, nq)),
            ("petsc2", "PETSc CG 2 ranks", {"petsc_ranks": 2}, min(petsc_queries, nq))):
        if name in methods:
            method = "diffusion" if name.startswith("cg-") else "truncated" if name.startswith("truncated") else name.rstrip("12")
            run(label, method, dataclasses.replace(base, **over), m)
    if "cg-loop" in methods:  # reference, not a product path: scipy's own cg, one query at a time
        L = diffusion_operator(W, base.alpha)
        m = min(loop_queries, nq)
        D, I = Rankers(X, base).knn.search(Q[:m], base.kq)
        t0 = time.perf_counter()
        ids = []
        for q in range(m):
            x, _ = scipy_cg(L, query_vectors(D[q : q + 1], I[q : q + 1], n, gamma=base.gamma)[:, 0], rtol=base.rtol, maxiter=base.maxiter)
            ids.append(topk_columns(x[:, None], topk)[0][0])
        record("scipy cg loop (reference)", ids, time.perf_counter() - t0, m)
    res["spmm"] = spmm_bound(W, base.alpha)
    res["peak_rss_gib"] = own_peak_gib()
    return res


def _run_child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pipelines.benchmarks.scale", *args]
    log.info("$ %s", " ".join(cmd[2:]))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"step failed: {' '.join(args)}\n{r.stderr[-3000:]}")
    sys.stderr.write("".join(l + "\n" for l in r.stderr.splitlines() if " scale:" in l or "INFO" in l))
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    lines = ["## Graph construction", "", "| N | index | build s | recall@k | nnz | peak RSS GiB |", "|---|---|---|---|---|---|"]
    for n, r in results.items():
        for g in r.get("graphs", []):
            lines.append(f"| {n} | {g['index']}{' nprobe ' + str(g['nprobe']) if g.get('nprobe') else ''} | {g['seconds_total']:.1f} | "
                         f"{g['recall_at_k']:.4f} | {g['nnz']} | {g['peak_rss_gib']:.2f} |")
    lines += ["", "## Ranking 1,000 planted queries (top-1000 kept)", "",
              "| N | graph | method | queries | seconds | queries/s | mAP | mAP, first queries | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in results.items():
        m = r.get("methods")
        if not m:
            continue
        for name, v in m.items():
            if not isinstance(v, dict) or "map" not in v:
                continue
            notes = []
            if "iterations_mean" in v:
                notes.append(f"{v['iterations_mean']:.1f} it")
            if v.get("not_converged"):
                notes.append(f"{v['not_converged']} not converged")
            if "offline_seconds" in v:
                notes.append(f"offline {v['offline_seconds']:.1f} s, {v['offline_bytes'] / 2**20:.0f} MiB")
            elif v.get("build_seconds", 0) >= 0.05:
                notes.append(f"ranker built in {v['build_seconds']:.2f} s")
            lines.append(f"| {n} | {m['graph']} | {name} | {v['queries']} | {v['seconds']:.2f} | {v['queries_per_s']:.1f} | "
                         f"{v['map']:.2f} | {v.get('map_subset', float('nan')):.2f} ({m.get('subset', '?')}) | {', '.join(notes)} |")
    lines += ["", "## Sparse product against the memory-bandwidth bound", "",
              "| N | nnz(L) | columns | bound s | plain scipy s (x bound) | reordered + threads s (x bound) | copy bandwidth GB/s |",
              "|---|---|---|---|---|---|---|"]
    for n, r in results.items():
        s = (r.get("methods") or {}).get("spmm")
        if s:
            lines.append(f"| {n} | {r['graphs'][-1]['nnz'] + int(n)} | {s['columns']} | {s['bound_seconds']:.4f} | {s['seconds']:.3f} "
                         f"({s['ratio_measured_to_bound']:.1f}x) | {s['seconds_reordered']:.3f} ({s['ratio_reordered_to_bound']:.1f}x) | {s['bandwidth_gbs']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", nargs="?", default="all", choices=["all", "gen", "graph", "methods", "recall", "recall-hnsw", "knn", "spmm"])
    ap.add_argument("--nlists", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--nprobes", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--out", type=Path, default=Path("runs/scale"))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--index", default="flat")
    ap.add_argument("--graph-dir", type=Path, default=None, help="spmm: a graph stage's folder (default: OUT/N/graph-INDEX)")
    ap.add_argument("--graphs", nargs="+", default=None, help="indexes to build per N (default: flat up to 1e5, hnsw above)")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--nlist", type=int, default=0)
    ap.add_argument("--hnsw-m", type=int, default=24)  # the graph stage's defaults (GraphConfig)
    ap.add_argument("--ef-construction", type=int, default=48)
    ap.add_argument("--ef-search", type=int, default=64)
    ap.add_argument("--topk", type=int, default=1000)
    ap.add_argument("--loop-queries", type=int, default=100)
    ap.add_argument("--petsc-queries", type=int, default=100)
    ap.add_argument("--exact-queries", type=int, default=0, help="queries for the block-CG rows (0: all)")
    ap.add_argument("--spectral-rank", type=int, default=256)
    ap.add_argument("--truncate-m", type=int, default=2000)
    ap.add_argument("--truncate-hops", type=int, default=8)
    ap.add_argument("--truncate-beam", type=int, default=1000)
    ap.add_argument("--methods", nargs="+", default=["aqe", "cg-float64", "cg-float32", "cg-float64-scipy", "cg-loop", "truncated", "spectral",
                                                      "petsc1", "petsc2"])
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s scale: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if a.step != "all":
        out = a.out / str(a.n[0])
        out.mkdir(parents=True, exist_ok=True)
        if a.step == "gen":
            r = step_gen(out, a.n[0], a.queries)
        elif a.step == "recall-hnsw":
            r = step_recall_hnsw(out, [51, 64, 96, 128])
        elif a.step == "knn":
            from .exact_search import step_knn

            r = step_knn(out)
        elif a.step == "recall":
            r = step_recall(out, a.nlists, a.nprobes)
        elif a.step == "spmm":
            r = step_spmm(a.graph_dir or out / f"graph-{a.index}")
        elif a.step == "graph":
            r = step_graph(out, a.index, a.k, a.nprobe, a.nlist, a.hnsw_m, a.ef_construction, a.ef_search)
        else:
            r = step_methods(out, a.index, a.queries, a.topk, a.loop_queries, a.petsc_queries, a.spectral_rank, a.truncate_m, a.methods,
                             a.truncate_hops, a.truncate_beam, a.exact_queries)
        print(json.dumps(r))
        return 0
    results = {}
    common = ["--out", str(a.out), "--queries", str(a.queries)]
    for n in a.n:
        ndir = a.out / str(n)
        ndir.mkdir(parents=True, exist_ok=True)
        r = {"gen": _run_child(["gen", "--n", str(n), *common]), "graphs": []}
        graphs = a.graphs or (["flat"] if n <= 100_000 else ["hnsw"])
        for g in graphs:
            r["graphs"].append(_run_child(["graph", "--n", str(n), "--index", g, "--k", str(a.k), "--nprobe", str(a.nprobe),
                                           "--nlist", str(a.nlist), "--hnsw-m", str(a.hnsw_m), "--ef-construction",
                                           str(a.ef_construction), "--ef-search", str(a.ef_search), *common]))
        r["methods"] = _run_child(["methods", "--n", str(n), "--index", graphs[-1], "--topk", str(a.topk), "--loop-queries",
                                   str(a.loop_queries), "--petsc-queries", str(a.petsc_queries), "--spectral-rank", str(a.spectral_rank),
                                   "--truncate-m", str(a.truncate_m), "--truncate-hops", str(a.truncate_hops),
                                   "--truncate-beam", str(a.truncate_beam), "--exact-queries", str(a.exact_queries), "--methods", *a.methods,
                                   *common])
        results[n] = r
        (ndir / "results.json").write_text(json.dumps(r, indent=2))
        (a.out / "RESULTS.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
