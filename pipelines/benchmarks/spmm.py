"""Exact diffusion's inner loop against memory bandwidth: one block-CG iteration and its sparse
product on a graph, per kernel and row order, through the product's own operators
(`retrieval.diffusion.sparse_operator`, `retrieval.compiled_spmm.block_cg_fused`, orders from
`retrieval.partition_order`).

Bounds at the measured copy bandwidth, for b columns of `itemsize` bytes (P, Q, X, R: n x b each):
- *stream*: the product reading the matrix, P once and writing Q once (every gathered row of P from cache);
- *gather*: every non-zero fetches its row of P from memory (no reuse at all);
- *cut*: stream, plus every non-zero whose two ends lie in different blocks of `ROWS_PER_PART` rows
  of the order fetches its row (rows inside a block reuse each other's): the gather traffic this order needs;
- *iteration*: one block-CG iteration as `block_cg_fused` runs it, the product's stream bytes plus
  its two passes (X, R read and written, P and Q read; R read, P read and written): matrix + 11 arrays.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def bandwidth_gbs() -> float:
    """Best of three 512 MiB copies, GB/s counting the bytes read and written."""
    a = np.ones(2**27, np.float32)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def _best(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _cut_nnz(L: sp.csr_matrix, perm: np.ndarray, rows: int) -> int:
    """Non-zeros of L whose row and column fall in different blocks of `rows` positions of `perm`."""
    pos = np.empty_like(perm)
    pos[perm] = np.arange(len(perm))
    blk = pos // rows
    r = np.repeat(blk, np.diff(L.indptr))
    return int((r != blk[L.indices]).sum())


def spmm_bound(W: sp.csr_matrix, alpha: float, dtypes: tuple = (np.float64,), columns: int = 128, repeats: int = 3,
               orders: tuple[str, ...] = ("rcm", "partition"), cg_iters: int = 4) -> dict:
    """Per dtype: the product's seconds for scipy's plain kernel, scipy on the RCM order in threads
    ("reordered") and the compiled kernel per row order (`compiled-<order>`, the p.q-fused product
    block CG runs), each against the bounds above; and one fused block-CG iteration per order."""
    from retrieval.compiled_spmm import CompiledSparse, block_cg_fused
    from retrieval.diffusion import diffusion_operator, sparse_operator
    from retrieval.partition_order import ROWS_PER_PART, row_order

    n = W.shape[0]
    bw = bandwidth_gbs()
    L = sp.csr_matrix(diffusion_operator(W, alpha))
    out: dict = {"bandwidth_gbs": bw, "columns": columns, "rows_per_part": ROWS_PER_PART, "orders": {}}
    perms = {}
    for o in orders:
        t0 = time.perf_counter()
        perms[o] = row_order(L, o)
        out["orders"][o] = {"seconds": time.perf_counter() - t0, "cut_fraction": _cut_nnz(L, perms[o], ROWS_PER_PART) / L.nnz}
    for dt in map(np.dtype, dtypes):
        arr = n * columns * dt.itemsize
        matrix = L.nnz * (dt.itemsize + 4) + (n + 1) * 8
        row = {"stream_bytes": matrix + 2 * arr, "gather_bytes": matrix + L.nnz * columns * dt.itemsize + arr,
               "iteration_bytes": matrix + 11 * arr}
        for k in ("stream", "gather", "iteration"):
            row[f"{k}_bound_seconds"] = row[f"{k}_bytes"] / (bw * 1e9)
        P = np.random.default_rng(0).random((n, columns)).astype(dt)
        for kind in ("scipy", "reordered"):
            op = sparse_operator(L, kind, dtype=dt.type)
            Pp = op.permute(P)
            t = _best(lambda: op @ Pp, repeats)
            row[kind] = {"seconds": t, "x_stream": t / row["stream_bound_seconds"], "x_gather": t / row["gather_bound_seconds"]}
            del op, Pp
        for o, perm in perms.items():
            op = CompiledSparse(L, dtype=dt.type, perm=perm)
            Pp, Q, part = op.permute(P), np.empty_like(P), np.zeros((len(op.blocks), columns))
            t = _best(lambda: op.matmul_dots(Pp, part, Q), repeats)
            cut = matrix + 2 * arr + out["orders"][o]["cut_fraction"] * L.nnz * columns * dt.itemsize
            # one iteration: the difference between solves of 2 and 2 + cg_iters iterations (rtol 0: every column runs)
            solve = {it: _best(lambda: block_cg_fused(op, Pp, rtol=0.0, maxiter=it), max(1, repeats - 1)) for it in (2, 2 + cg_iters)}
            it_s = (solve[2 + cg_iters] - solve[2]) / cg_iters
            row[f"compiled-{o}"] = {"seconds": t, "x_stream": t / row["stream_bound_seconds"], "x_gather": t / row["gather_bound_seconds"],
                                    "cut_bound_seconds": cut / (bw * 1e9), "x_cut": t / (cut / (bw * 1e9)),
                                    "cg_iteration_seconds": it_s, "cg_x_iteration": it_s / row["iteration_bound_seconds"]}
            del op, Pp, Q
        row["compiled"] = row[f"compiled-{orders[0]}"]
        out[dt.name] = row
    # the fields the methods step reported before (float64)
    f64 = out.get("float64")
    if f64:
        out.update(seconds=f64["scipy"]["seconds"], seconds_reordered=f64["reordered"]["seconds"],
                   seconds_compiled=f64["compiled"]["seconds"], bytes=f64["stream_bytes"], bound_seconds=f64["stream_bound_seconds"],
                   ratio_measured_to_bound=f64["scipy"]["x_stream"], ratio_reordered_to_bound=f64["reordered"]["x_stream"],
                   ratio_compiled_to_bound=f64["compiled"]["x_stream"])
    return out


def step_spmm(graph_dir: Path, repeats: int = 3) -> dict:
    """The measurement alone, float64 and float32, on the graph in `graph_dir` (the graph stage's folder)."""
    from pipelines.graph import load_graph

    W, _ = load_graph(graph_dir)
    return spmm_bound(W, 0.99, dtypes=(np.float64, np.float32), repeats=repeats)
