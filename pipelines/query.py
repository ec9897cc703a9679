"""Query stage: a batch of query descriptors -> rankings by kNN, alpha-QE and diffusion.

Writes `ranks/<method>.parquet` with `query` (key), `ids` (ranked database ids) and `scores`;
diffusion also records per-query CG `iterations`, `residual` and `converged`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from retrieval.diffusion import diffusion_scores, rank_by_scores
from retrieval.knn import knn_search
from retrieval.query_expansion import alpha_qe

from .config import QueryConfig, params_hash
from .descriptors import load_descriptors
from .graph import load_graph
from .shards import read_json, shard_done, write_json, write_table

log = logging.getLogger(__name__)


def _topk(cfg: QueryConfig, n: int) -> int:
    return n if cfg.topk <= 0 else min(cfg.topk, n)


def rank_knn(Q: np.ndarray, X: np.ndarray, cfg: QueryConfig, **_) -> dict:
    D, I = knn_search(Q, X, _topk(cfg, X.shape[0]))
    return {"ids": I, "scores": D}


def rank_aqe(Q: np.ndarray, X: np.ndarray, cfg: QueryConfig, **_) -> dict:
    D, I = knn_search(Q, X, cfg.aqe_n)
    Qe = alpha_qe(Q, X, I, D, n=cfg.aqe_n, alpha=cfg.aqe_alpha)
    D2, I2 = knn_search(Qe, X, _topk(cfg, X.shape[0]))
    return {"ids": I2, "scores": D2}


def rank_diffusion(Q: np.ndarray, X: np.ndarray, cfg: QueryConfig, *, W, **_) -> dict:
    D, I = knn_search(Q, X, cfg.kq)
    scores, stats = diffusion_scores(W, D, I, alpha=cfg.alpha, gamma=cfg.gamma, rtol=cfg.rtol, maxiter=cfg.maxiter)
    sims = Q @ X.T  # tie-break for items the diffusion does not reach
    order = rank_by_scores(scores, sims)[:, : _topk(cfg, X.shape[0])]
    return {
        "ids": order,
        "scores": np.take_along_axis(scores, order, axis=1).astype(np.float32),
        "iterations": stats.iterations,
        "residual": stats.residuals,
        "converged": stats.converged,
    }


METHODS: dict[str, Callable[..., dict]] = {"knn": rank_knn, "aqe": rank_aqe, "diffusion": rank_diffusion}


def ranks_table(query_keys: list[str], result: dict) -> pa.Table:
    cols = {
        "query": pa.array(query_keys, pa.string()),
        "ids": pa.array(list(result["ids"].astype(np.int64)), pa.list_(pa.int64())),
        "scores": pa.array(list(result["scores"].astype(np.float32)), pa.list_(pa.float32())),
    }
    for extra in ("iterations", "residual", "converged"):
        if extra in result:
            cols[extra] = pa.array(result[extra])
    return pa.table(cols)


def run_query(run_dir: Path, query_dir: Path, cfg: QueryConfig) -> dict:
    """Rank every query in `query_dir/descriptors` against `run_dir` with each configured method."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"query: unknown method(s) {unknown}; known: {sorted(METHODS)}")
    _, _, X = load_descriptors(run_dir / "descriptors")
    _, qkeys, Q = load_descriptors(query_dir / "descriptors")
    if Q.shape[1] != X.shape[1]:
        raise ValueError(f"query: query dimension {Q.shape[1]} != database dimension {X.shape[1]}")
    W = None
    if "diffusion" in cfg.methods:
        W, gman = load_graph(run_dir / "graph")
        if W.shape[0] != X.shape[0]:
            raise ValueError(f"query: graph has {W.shape[0]} nodes but the database has {X.shape[0]} descriptors")
    inputs = params_hash({"db": read_json(run_dir / "manifest.json").get("descriptors_sha256_16"),
                          "q": read_json(query_dir / "manifest.json").get("descriptors_sha256_16"),
                          "graph": read_json(run_dir / "graph" / "manifest.json").get("params") if W is not None else None})
    summary = {}
    for m in cfg.methods:
        path = run_dir / "ranks" / f"{m}.parquet"
        phash = params_hash({"cfg": cfg, "method": m, "inputs": inputs})
        if shard_done(path, params=phash):
            log.info("query: %s ranks up to date, skipping", m)
            summary[m] = {"skipped": True}
            continue
        t0 = time.perf_counter()
        res = METHODS[m](Q, X, cfg, W=W)
        dt = time.perf_counter() - t0
        write_table(ranks_table(qkeys, res), path, params=phash)
        info = {"queries": len(qkeys), "seconds": dt, "queries_per_s": len(qkeys) / dt if dt > 0 else None}
        if "iterations" in res:
            info.update(iterations_mean=float(res["iterations"].mean()), iterations_max=int(res["iterations"].max()),
                        residual_max=float(res["residual"].max()), not_converged=int((~res["converged"]).sum()))
        summary[m] = info
        log.info("query: %s on %d queries in %.3f s", m, len(qkeys), dt)
    write_json(summary, run_dir / "ranks" / "stats.json")
    return summary
