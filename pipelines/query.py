"""Query stage: a batch of query descriptors -> rankings by every configured method.

Writes `ranks/<method>.parquet` with `query` (key), `ids` (ranked database ids) and `scores`; the
CG solvers also record per-query `iterations`, `residual` and `converged`. Every method ranks
through `pipelines.rankers.Rankers` (built once per index).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from retrieval.rankers import GRAPH_METHODS, METHODS, REGION_METHODS, Ranking

from .config import QueryConfig, params_hash
from .descriptors import load_descriptors
from .rankers import Rankers
from .shards import read_json, read_json_or, shard_done, write_json, write_table

log = logging.getLogger(__name__)


def ranks_table(query_keys: list[str], ranking: Ranking, db_ids: np.ndarray) -> pa.Table:
    """One row per query: `query`, ranked database `ids` (rows mapped through db_ids), `scores`,
    and the solver's `iterations`, `residual`, `converged` when there are any."""
    cols = {
        "query": pa.array(query_keys, pa.string()),
        "ids": pa.array(list(db_ids[ranking.ids].astype(np.int64)), pa.list_(pa.int64())),
        "scores": pa.array(list(np.asarray(ranking.scores, np.float32)), pa.list_(pa.float32())),
    }
    if ranking.stats is not None:
        cols["iterations"] = pa.array(np.asarray(ranking.stats.iterations))
        cols["residual"] = pa.array(np.asarray(ranking.stats.residuals))
        cols["converged"] = pa.array(np.asarray(ranking.stats.converged))
    return pa.table(cols)


def solver_summary(ranking: Ranking) -> dict:
    """CG statistics of a ranking (empty for methods without a solver)."""
    st = ranking.stats
    if st is None or not len(st.iterations):
        return {}
    return {"iterations_mean": float(st.iterations.mean()), "iterations_max": int(st.iterations.max()),
            "residual_max": float(st.residuals.max()), "not_converged": int((~st.converged).sum())}


def run_query(run_dir: Path, query_dir: Path, cfg: QueryConfig) -> dict:
    """Rank every query in `query_dir/descriptors` against `run_dir` with each configured method."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"query: unknown method(s) {unknown}; known: {list(METHODS)}")
    db_ids, _, X = load_descriptors(run_dir / "descriptors", dense=False, keys=False)
    q_ids, qkeys, Q = load_descriptors(query_dir / "descriptors", dense=False)
    if Q.shape[1] != X.shape[1]:
        raise ValueError(f"query: query dimension {Q.shape[1]} != database dimension {X.shape[1]}")
    uses_graph = bool(GRAPH_METHODS & set(cfg.methods))
    rankers = Rankers(X, cfg, graph_dir=run_dir / "graph")
    del X  # the rankers own the rows (and may trade them for the seed index's copy)
    if uses_graph and not rankers.has_graph:
        raise ValueError(f"query: {run_dir / 'graph'} has no graph: run the graph stage first")
    inputs = params_hash({"db": read_json(run_dir / "manifest.json").get("descriptors_sha256_16"),
                          "q": read_json(query_dir / "manifest.json").get("descriptors_sha256_16"),
                          "graph": read_json(run_dir / "graph" / "manifest.json").get("params") if uses_graph else None,
                          **({"regions": read_json(run_dir / "regions" / "manifest.json").get("params")}
                             if REGION_METHODS & set(cfg.methods) and (run_dir / "regions" / "manifest.json").is_file() else {})})
    qregions = None
    summary = {}
    spath = run_dir / "ranks" / "stats.json"
    before = read_json_or(spath, {})  # a skipped method keeps the figures of the run that made its ranks
    for m in cfg.methods:
        path = run_dir / "ranks" / f"{m}.parquet"
        phash = params_hash({"cfg": cfg, "method": m, "inputs": inputs})
        if shard_done(path, params=phash):
            log.info("query: %s ranks up to date, skipping", m)
            prev = before.get(m) if isinstance(before, dict) else None
            summary[m] = {**(prev if isinstance(prev, dict) else {}), "skipped": True}
            continue
        t0 = time.perf_counter()
        rankers.get(m)  # built here, so that its build is timed apart from the ranking
        t_build = time.perf_counter() - t0
        if m in REGION_METHODS and qregions is None:
            from .regions import query_regions

            qregions = query_regions(query_dir, run_dir, q_ids)
        ranking = rankers.rank(m, Q, cfg.topk, regions=qregions if m in REGION_METHODS else None)
        dt = time.perf_counter() - t0 - t_build
        write_table(ranks_table(qkeys, ranking, db_ids), path, params=phash)  # methods rank rows; ranks store image ids
        summary[m] = {"queries": len(qkeys), "seconds": dt, "build_seconds": t_build,
                      "queries_per_s": len(qkeys) / dt if dt > 0 else None, **solver_summary(ranking)}
        log.info("query: %s on %d queries in %.3f s (ranker built in %.3f s)", m, len(qkeys), dt, t_build)
    write_json(summary, spath)
    return summary


def read_ranks(run_dir: str | Path, method: str, topk: int | None = None) -> pa.Table:
    """`ranks/<method>.parquet` with the ranked database keys beside their ids: one row per query,
    `query`, `keys` (list of str), `ids`, `scores` (the first `topk` of each, or all).

        from pipelines.query import read_ranks; print(read_ranks("runs/demo", "diffusion", 10).to_pandas())
    """
    from .shards import read_table

    run_dir = Path(run_dir)
    path = run_dir / "ranks" / f"{method}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"ranks: {path} does not exist (run the query stage with method {method!r})")
    t = read_table(path, ["query", "ids", "scores"])
    ids, keys, _ = load_descriptors(run_dir / "descriptors", dense=False)
    key_of = dict(zip(ids.tolist(), keys))
    ranked = [r[:topk] for r in t.column("ids").to_pylist()]
    return pa.table({"query": t.column("query"), "keys": pa.array([[key_of[i] for i in r] for r in ranked], pa.list_(pa.string())),
                     "ids": pa.array(ranked, pa.list_(pa.int64())),
                     "scores": pa.array([r[:topk] for r in t.column("scores").to_pylist()], pa.list_(pa.float32()))})
