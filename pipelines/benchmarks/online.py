"""Online cost of diffusion for new queries, through the CLI: import -> graph -> query per method.

    python -m pipelines.benchmarks.online --n 100000 --out runs/online
    python -m pipelines.benchmarks.online --n 1000000 --index hnsw --exact-queries 200 --out runs/online

The scale benchmark's manifold (same generator and seed) is written as .npy, then every stage runs
as the user runs it, each in its own process (so its wall time and peak RSS are its own):
`retrieval import-descriptors`, `retrieval graph CONFIG`, and `retrieval query CONFIG` once per
variant (a variant is a [query] section: the method and its settings). The query stage's own
stats give each method's ranking time (kNN search of the seeds included) and its build time; mAP
is computed here from the ranks it wrote. The exact solve can run on the first `--exact-queries`
only (a second run directory sharing the graph); every method's mAP is also given on those.
Results: `OUT/N/online.json` and a Markdown table on stdout.

    python -m pipelines.benchmarks.online --run runs/demo --gnd runs/demo/benchmark/gnd.json --out runs/online

runs the same variants on a finished run with real ground truth (query + evaluate per variant, on a
copy of its descriptors, queries and graph): `OUT/online-<run>.json`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipelines.logs import setup_logging

log = logging.getLogger("online")

TRUNC = {"truncate_m": 2000, "truncate_hops": 8, "truncate_beam": 1000, "seed_search": "exact"}
# label -> [query] settings; the first two are the table's methods, then the kernel variants
VARIANTS: dict[str, dict] = {
    "knn (exact search)": {"methods": ["knn"]},
    "exact block CG float32": {"methods": ["diffusion"], "dtype": "float32", "rtol": 1e-5, "seed_search": "exact"},
    "exact block CG float32, compiled product": {"methods": ["diffusion"], "dtype": "float32", "rtol": 1e-5, "matmul": "compiled",
                                                 "seed_search": "exact"},
    "truncated, scipy (m 2000, 8 hops, beam 1000)": {"methods": ["truncated"], **TRUNC, "truncate_kernel": "scipy"},
    "truncated, compiled (m 2000, 8 hops, beam 1000)": {"methods": ["truncated"], **TRUNC},
    "truncated, compiled (m 2000, 16 hops, beam 500)": {"methods": ["truncated"], **TRUNC, "truncate_hops": 16, "truncate_beam": 500},
    "truncated, compiled, 10 strongest edges (m 2000, 16 hops, beam 1000)":
        {"methods": ["truncated"], **TRUNC, "truncate_hops": 16, "truncate_edges": 10},
    "truncated, compiled, HNSW seeds (m 2000, 8 hops, beam 1000)": {"methods": ["truncated"], **TRUNC, "seed_search": "index"},
    "truncated, compiled, HNSW seeds (m 2000, 16 hops, beam 500)":
        {"methods": ["truncated"], **TRUNC, "truncate_hops": 16, "truncate_beam": 500, "seed_search": "index"},
    "truncated, compiled, HNSW seeds (m 1500, 10 hops, beam 800, rtol 1e-4)":
        {"methods": ["truncated"], **TRUNC, "truncate_m": 1500, "truncate_hops": 10, "truncate_beam": 800, "rtol": 1e-4,
         "seed_search": "index"},
    "truncated, compiled, HNSW seeds, 10 strongest edges (m 2000, 16 hops, beam 1000)":
        {"methods": ["truncated"], **TRUNC, "truncate_hops": 16, "truncate_edges": 10, "seed_search": "index"},
    # the exact solve's rows in RCM order instead of the default METIS-partition order
    "exact block CG float32, compiled product, RCM order": {"methods": ["diffusion"], "dtype": "float32", "rtol": 1e-5,
                                                            "matmul": "compiled", "seed_search": "exact", "order": "rcm"},
    # each database item's truncated diffusion computed once (its build time is the offline step;
    # kept in graph/, so a second run reads it back), a new query summing its seeds' rows
    "precomputed rows, HNSW seeds (m 1500, 12 hops, beam 500, rtol 1e-3, keep 700)":
        {"methods": ["precomputed"], **TRUNC, "truncate_m": 1500, "truncate_hops": 12, "truncate_beam": 500, "rtol": 1e-3,
         "precompute_keep": 700, "precompute_group": 1, "seed_search": "index"},
    # the same rows, four neighbouring items per selection (a wider beam covers the four)
    "precomputed rows in groups of 4, HNSW seeds (m 1500, 12 hops, beam 800, rtol 1e-3, keep 700)":
        {"methods": ["precomputed"], **TRUNC, "truncate_m": 1500, "truncate_hops": 12, "truncate_beam": 800, "rtol": 1e-3,
         "precompute_keep": 700, "precompute_group": 4, "seed_search": "index"},
}


def _toml(out: Path, graph: dict, query: dict) -> str:
    def val(v):
        return json.dumps(v)  # numbers, strings and lists of strings are valid TOML as JSON

    lines = [f"out = {val(str(out))}", "", "[graph]"] + [f"{k} = {val(v)}" for k, v in graph.items()]
    lines += ["", "[query]"] + [f"{k} = {val(v)}" for k, v in query.items()]
    return "\n".join(lines) + "\n"


def run_child(cmd: list[str]) -> dict:
    """Run one CLI command; its wall seconds and its own peak RSS (`pipelines.peak_memory`)."""
    from pipelines.peak_memory import run_measured

    res = run_measured(cmd, stdout=subprocess.DEVNULL)
    if res["returncode"] != 0:
        raise RuntimeError(f"online: {' '.join(cmd)} exited {res['returncode']}")
    return {"seconds": res["seconds"], "peak_rss_gib": res["peak_rss_gib"]}


def _map(run: Path, method: str, gnd: list[dict], first: int) -> tuple[float, float]:
    from pipelines.query import read_ranks
    from retrieval.metrics import compute_map

    t = read_ranks(run, method)
    keys = t.column("query").to_pylist()
    ids = np.array(t.column("ids").to_pylist(), np.int64)
    order = np.argsort([int(k[1:]) for k in keys])  # imported queries are keyed q00000000, ...
    ids = ids[order]
    g = gnd[: len(ids)]
    return compute_map(ids.T, g).map * 100, compute_map(ids[:first].T, g[:first]).map * 100


def graph_setting(text: str) -> tuple[str, object]:
    """`KEY=VALUE` of an extra [graph] setting (`hnsw_m=32`): the value as JSON (numbers) or a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _graph_of(res: dict) -> dict:
    """The [graph] settings of a results file (files from before `--graph` name only k and the index)."""
    return res.get("graph", {"k": res["k"], "index": res["index"]})


def bench(out: Path, n: int, nq: int, index: str, k: int, exact_queries: int, variants: list[str], batch: int = 0,
          graph_extra: dict | None = None) -> dict:
    from pipelines.benchmarks.scale import step_gen
    from retrieval.synthetic_manifold import positives

    data = out / str(n)
    if not (data / "X.npy").is_file():
        data.mkdir(parents=True, exist_ok=True)
        step_gen(data, n, nq)
    Q = np.load(data / "Q.npy")[:nq]
    gnd = [{"ok": p} for p in positives(np.load(data / "labels.npy"), np.load(data / "qlabels.npy")[:nq])]
    exe = [sys.executable, "-m", "pipelines.cli"]
    graph = {"k": k, "index": index, **(graph_extra or {})}
    res: dict = {"n": n, "queries": nq, "index": index, "k": k, "graph": graph, "stages": {}, "methods": {}}
    if (data / "online.json").is_file():  # a rerun keeps the stage times it reuses and the variants it does not run again
        before = json.loads((data / "online.json").read_text())
        if _graph_of(before) != graph:
            raise SystemExit(f"online: {data} holds a graph built with {before.get('graph')}, not {graph}: use another --out")
        res["stages"], res["methods"] = before.get("stages", {}), before.get("methods", {})
    runs = {"all": (data / "run", nq)}
    if 0 < exact_queries < nq:
        runs["exact"] = (data / "run-exact", exact_queries)
    for name, (run, m) in runs.items():
        if not (run / "graph" / "manifest.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            np.save(data / f"Q-{m}.npy", Q[:m])
            res["stages"][f"import ({name})"] = run_child(exe + ["import-descriptors", str(data / "X.npy"), "--out", str(run),
                                                                 "--queries", str(data / f"Q-{m}.npy")])
            if name == "all":
                cfg = data / "graph.toml"
                cfg.write_text(_toml(run, graph, {}))
                res["stages"]["graph"] = run_child(exe + ["graph", str(cfg)])
                res["stages"]["graph"].update(json.loads((run / "graph" / "manifest.json").read_text()).get("stats", {}))
            else:  # the same graph, not built twice (hard links: 10^7 rows' graph is ~20 GB; every write is a rename)
                shutil.copytree(runs["all"][0] / "graph", run / "graph", copy_function=os.link)
    (data / "online.json").write_text(json.dumps(res, indent=1))  # the stages' figures, then each variant's as it ends
    for label in variants:
        over = VARIANTS[label]
        exact = over["methods"] == ["diffusion"]  # the exact solves share the exact-queries run
        run, m = runs["exact" if exact and "exact" in runs else "all"]
        cfg = data / "query.toml"
        cfg.write_text(_toml(run, graph, {"topk": 1000, "kq": 10, "alpha": 0.99, "gamma": 3.0, **over, **({"batch": batch} if batch else {})}))
        shutil.rmtree(run / "ranks", ignore_errors=True)
        stage = run_child(exe + ["query", str(cfg)])
        method = over["methods"][0]
        st = json.loads((run / "ranks" / "stats.json").read_text())[method]
        mp, mfirst = _map(run, method, gnd, exact_queries or nq)
        res["methods"][label] = {"queries": m, "seconds": st["seconds"], "ms_per_query": 1000 * st["seconds"] / m,
                                 "build_seconds": st["build_seconds"], "map": mp, "map_first": mfirst,
                                 "iterations_mean": st.get("iterations_mean"), "stage_seconds": stage["seconds"],
                                 "peak_rss_gib": stage["peak_rss_gib"]}
        log.info("%s: %.3f ms/query, mAP %.2f (first %d: %.2f), build %.1f s, peak %.2f GiB", label,
                 res["methods"][label]["ms_per_query"], mp, exact_queries or nq, mfirst, st["build_seconds"], stage["peak_rss_gib"])
        (data / "online.json").write_text(json.dumps(res, indent=1))  # after every variant: a later one may not fit
    return res


def bench_run(out: Path, run: Path, gnd: Path, variants: list[str]) -> dict:
    """The same variants on a finished run with real ground truth (`retrieval query` then
    `retrieval evaluate` per variant), on a copy of the run's descriptors, queries and graph."""
    dest = out / f"run-{run.name}"
    if not (dest / "graph" / "manifest.json").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        keep = shutil.ignore_patterns("images", "features", "ranks")
        for part in ("descriptors", "queries", "graph"):
            shutil.copytree(run / part, dest / part, ignore=keep)
        shutil.copy2(run / "manifest.json", dest / "manifest.json")
    exe = [sys.executable, "-m", "pipelines.cli"]
    res: dict = {"run": str(run), "gnd": str(gnd), "methods": {}}
    for label in variants:
        over = VARIANTS[label]
        method = over["methods"][0]
        cfg = out / "run-query.toml"
        cfg.write_text(_toml(dest, {}, {"topk": 1000, "kq": 10, "alpha": 0.99, "gamma": 3.0, **over})
                       + f"\n[dataset]\ngnd = {json.dumps(str(gnd.resolve()))}\n")
        shutil.rmtree(dest / "ranks", ignore_errors=True)
        run_child(exe + ["query", str(cfg)])
        run_child(exe + ["evaluate", str(cfg)])
        st = json.loads((dest / "ranks" / "stats.json").read_text())[method]
        res["methods"][label] = {"map": json.loads((dest / "metrics.json").read_text())[method], "queries": st["queries"],
                                 "ms_per_query": 1000 * st["seconds"] / st["queries"]}
        log.info("%s: %s", label, res["methods"][label])
    (out / f"online-{run.name}.json").write_text(json.dumps(res, indent=1))
    return res


def markdown_run(res: dict) -> str:
    rows = [f"{res['run']} (ground truth {res['gnd']})", "", "| method | queries | ms / query | mAP E | M | H |", "|---|---|---|---|---|---|"]
    rows += [f"| {label} | {v['queries']} | {v['ms_per_query']:.3f} | {v['map'].get('E', v['map'].get('mAP', ''))} | "
             f"{v['map'].get('M', '')} | {v['map'].get('H', '')} |" for label, v in res["methods"].items()]
    return "\n".join(rows)


def markdown(res: dict) -> str:
    first = next((v["queries"] for v in res["methods"].values() if v["queries"] < res["queries"]), res["queries"])
    graph = ", ".join(f"{k} {v}" for k, v in _graph_of(res).items())
    rows = [f"N = {res['n']}, graph ({graph}), {res['queries']} new queries, top-1000", "",
            "| stage | seconds | peak RSS GiB |", "|---|---|---|"]
    rows += [f"| {s} | {v['seconds']:.1f} | {v['peak_rss_gib']:.2f} |" for s, v in res["stages"].items()]
    rows += ["", f"| method | queries | ms / query | mAP | mAP, first {first} | build s | CG it | query stage peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for label, v in res["methods"].items():
        it = f"{v['iterations_mean']:.1f}" if v.get("iterations_mean") is not None else ""
        mp = f"{v['map']:.2f}" if v["queries"] == res["queries"] else ""
        rows.append(f"| {label} | {v['queries']} | {v['ms_per_query']:.3f} | {mp} | {v['map_first']:.2f} | {v['build_seconds']:.1f} | "
                    f"{it} | {v['peak_rss_gib']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--out", default="runs/online")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivf"])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--exact-queries", type=int, default=0, help="the exact solve on the first this many queries only (0: all)")
    ap.add_argument("--batch", type=int, default=0, help="[query] batch: right-hand sides per block CG solve (0: the default; memory O(N batch))")
    ap.add_argument("--graph", nargs="+", type=graph_setting, default=[], metavar="KEY=VALUE",
                    help="more [graph] settings, e.g. hnsw_m=32 ef_construction=80 (an OUT holds one graph's figures)")
    ap.add_argument("--variants", nargs="+", type=int, help=f"indexes into {list(VARIANTS)} (default: all)")
    ap.add_argument("--run", type=Path, help="instead: a finished run directory (descriptors, queries, graph) ...")
    ap.add_argument("--gnd", type=Path, help="... and its ground truth (any format `retrieval evaluate` reads)")
    a = ap.parse_args(argv)
    setup_logging()
    labels = list(VARIANTS)
    chosen = [labels[i] for i in a.variants] if a.variants else labels
    if a.run:
        if not a.gnd:
            ap.error("--run needs --gnd")
        Path(a.out).mkdir(parents=True, exist_ok=True)
        print(markdown_run(bench_run(Path(a.out), a.run, a.gnd, chosen)))
        return 0
    res = bench(Path(a.out), a.n, a.queries, a.index, a.k, a.exact_queries, chosen, a.batch, dict(a.graph))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
