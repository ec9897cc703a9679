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

from retrieval.diffusion import diffusion_scores, diffusion_topk, rank_by_scores, truncated_diffusion
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


def _stats(st) -> dict:
    return {"iterations": np.asarray(st.iterations), "residual": np.asarray(st.residuals), "converged": np.asarray(st.converged)}


def _dtype(cfg: QueryConfig):
    if cfg.dtype not in ("float64", "float32"):
        raise ValueError(f"query: dtype must be float64 or float32, got {cfg.dtype!r}")
    return np.float64 if cfg.dtype == "float64" else np.float32


def rank_diffusion(Q: np.ndarray, X: np.ndarray, cfg: QueryConfig, *, W, **_) -> dict:
    """Exact diffusion by block CG on the whole graph."""
    D, I = knn_search(Q, X, cfg.kq)
    n, k = X.shape[0], _topk(cfg, X.shape[0])
    if k == n and n * Q.shape[0] <= 50_000_000:
        # full ranking: items the diffusion does not reach are ordered by plain similarity
        scores, st = diffusion_scores(W, D, I, alpha=cfg.alpha, gamma=cfg.gamma, rtol=cfg.rtol, maxiter=cfg.maxiter)
        order = rank_by_scores(scores, Q @ X.T)
        return {"ids": order, "scores": np.take_along_axis(scores, order, axis=1).astype(np.float32), **_stats(st)}
    ids, sc, st = diffusion_topk(W, D, I, k, alpha=cfg.alpha, gamma=cfg.gamma, rtol=cfg.rtol, maxiter=cfg.maxiter,
                                 batch=cfg.batch, matmul=cfg.matmul, dtype=_dtype(cfg))
    return {"ids": ids, "scores": sc, **_stats(st)}


def _pad_with_knn(ids_list, sc_list, Q, X, k):
    """Fill rankings shorter than k with the remaining items by plain similarity."""
    n = X.shape[0]
    out_i = np.empty((len(ids_list), k), np.int64)
    out_s = np.empty((len(ids_list), k), np.float32)
    need = max(k - min(len(i) for i in ids_list), 0) if ids_list else 0
    Dk, Ik = knn_search(Q, X, min(n, k + need)) if need else (None, None)
    for q, (ids, sc) in enumerate(zip(ids_list, sc_list)):
        ids = ids[:k]
        if ids.size < k:
            rest = Ik[q][~np.isin(Ik[q], ids)][: k - ids.size]
            ids = np.concatenate([ids, rest])
            sc = np.concatenate([sc[: len(ids) - len(rest)], np.zeros(len(rest))])
        out_i[q], out_s[q] = ids, sc[:k]
    return out_i, out_s


def rank_truncated(Q: np.ndarray, X: np.ndarray, cfg: QueryConfig, *, W, **_) -> dict:
    """Diffusion on each query's m-node graph neighbourhood; the rest ranked by similarity."""
    D, I = knn_search(Q, X, cfg.kq)
    ids, sc, st = truncated_diffusion(W, D, I, m=min(cfg.truncate_m, X.shape[0]), alpha=cfg.alpha, gamma=cfg.gamma,
                                      rtol=cfg.rtol, maxiter=cfg.maxiter, select=cfg.truncate_select, hops=cfg.truncate_hops,
                                      beam=cfg.truncate_beam or None)
    I, S = _pad_with_knn(ids, sc, Q, X, _topk(cfg, X.shape[0]))
    return {"ids": I, "scores": S, **_stats(st)}


def rank_spectral(Q: np.ndarray, X: np.ndarray, cfg: QueryConfig, *, W, run_dir: Path, **_) -> dict:
    """Fast spectral ranking: offline eigendecomposition (cached in graph/), online inner products."""
    emb = spectral_cached(W, run_dir / "graph", rank=cfg.spectral_rank, alpha=cfg.alpha)
    D, I = knn_search(Q, X, cfg.kq)
    Z = emb.query(query_vectors_sparse(D, I, X.shape[0], gamma=cfg.gamma))
    S, Iv = knn_search(Z, emb.V, _topk(cfg, X.shape[0]))
    return {"ids": Iv, "scores": S}


def rank_petsc(Q: np.ndarray, X: np.ndarray, cfg: QueryConfig, *, run_dir: Path, **_) -> dict:
    """Exact diffusion with PETSc CG on `petsc_ranks` MPI processes (each loads its row blocks)."""
    from cluster.petsc_ray import solve_on_ray
    from cluster.petsc_solver import solve_with_mpiexec

    launchers = {"mpiexec": solve_with_mpiexec, "ray": solve_on_ray}
    if cfg.petsc_launch not in launchers:
        raise ValueError(f"query: petsc_launch must be one of {sorted(launchers)}, got {cfg.petsc_launch!r}")
    D, I = knn_search(Q, X, cfg.kq)
    ids, sc, st = launchers[cfg.petsc_launch](run_dir / "graph", D, I, ranks=cfg.petsc_ranks, k=_topk(cfg, X.shape[0]), alpha=cfg.alpha,
                                              gamma=cfg.gamma, rtol=cfg.rtol, maxiter=cfg.maxiter)
    return {"ids": ids, "scores": sc, "iterations": st["iterations"], "residual": st["residuals"], "converged": st["converged"]}


def query_vectors_sparse(D: np.ndarray, I: np.ndarray, n: int, *, gamma: float):
    """Sparse (n, nq) version of `query_vectors` for large n."""
    import scipy.sparse as sp

    nq, kq = I.shape
    return sp.csr_matrix((np.maximum(D.ravel().astype(np.float64), 0) ** gamma, (I.ravel(), np.repeat(np.arange(nq), kq))), shape=(n, nq))


def spectral_cached(W, graph_dir: Path, *, rank: int, alpha: float):
    """Spectral embedding of W, computed once per (graph, rank, alpha) and stored in graph_dir."""
    import io

    from retrieval.spectral import SpectralEmbedding, spectral_embedding

    from .shards import write_bytes

    gparams = read_json(graph_dir / "manifest.json").get("params")
    path = graph_dir / f"spectral-r{rank}-a{alpha}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["graph"]) == str(gparams):
                return SpectralEmbedding(V=z["V"], U=z["U"], lam=z["lam"], alpha=float(z["alpha"]))
    t0 = time.perf_counter()
    emb = spectral_embedding(W, rank=rank, alpha=alpha)
    log.info("spectral: %d eigenpairs of W (n=%d) in %.1f s", emb.lam.size, W.shape[0], time.perf_counter() - t0)
    buf = io.BytesIO()
    np.savez(buf, V=emb.V, U=emb.U, lam=emb.lam, alpha=np.float64(alpha), graph=np.array(str(gparams)))
    write_bytes(buf.getvalue(), path)
    return emb


# Every ranking method, diffusion solvers included, behind one interface:
# fn(Q (nq, d), X (n, d), cfg, *, W, run_dir) -> {"ids": (nq, k), "scores": (nq, k), [solver stats]}
METHODS: dict[str, Callable[..., dict]] = {
    "knn": rank_knn,
    "aqe": rank_aqe,
    "diffusion": rank_diffusion,
    "truncated": rank_truncated,
    "spectral": rank_spectral,
    "petsc": rank_petsc,
}
GRAPH_METHODS = {"diffusion", "truncated", "spectral", "petsc"}


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
    db_ids, _, X = load_descriptors(run_dir / "descriptors", dense=False)
    _, qkeys, Q = load_descriptors(query_dir / "descriptors", dense=False)
    if Q.shape[1] != X.shape[1]:
        raise ValueError(f"query: query dimension {Q.shape[1]} != database dimension {X.shape[1]}")
    W = None
    if GRAPH_METHODS & set(cfg.methods):
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
        res = METHODS[m](Q, X, cfg, W=W, run_dir=run_dir)
        res["ids"] = db_ids[res["ids"]]  # methods rank rows; ranks store image ids (ids may have gaps)
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
