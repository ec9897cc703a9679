"""The rankers of a run: one registry from method name to builder, and a set that builds each
ranker once (on first use) over the run's descriptors and graph and keeps it.

The query stage, the query service, the batch query job and the benchmarks all rank through
`Rankers`, so the state each method needs (search block, diffusion operator and its reordering,
truncated solver, spectral embedding, PETSc launcher) is built once per index, never per call.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from retrieval.rankers import (
    GRAPH_METHODS, METHODS, REGION_METHODS, AqeRanker, DiffusionRanker, KnnRanker, PrecomputedRanker, Ranker, Ranking, SpectralRanker,
    TruncatedRanker,
)
from retrieval.knn import IndexSpec, build_index, stored_vectors
from retrieval.precomputed import ItemRows
from retrieval.spectral import SpectralEmbedding, spectral_embedding

from .config import QueryConfig
from .shards import read_json, write_bytes, write_json, write_npz, write_with

log = logging.getLogger(__name__)


def graph_identity(graph_dir: Path | None) -> str:
    """What the files computed from a stored graph are keyed by: its parameters, nodes and edges
    (a graph grown by an update or rebuilt differently gets new ones); "" without a folder."""
    if graph_dir is None:
        return ""
    m = read_json(graph_dir / "manifest.json")
    return f"{m.get('params')}/{m.get('n')}/{m.get('nnz')}"


def spectral_cached(W: sp.spmatrix, graph_dir: Path | None, *, rank: int, alpha: float) -> SpectralEmbedding:
    """Spectral embedding of W, computed once per (graph, rank, alpha) and stored in graph_dir."""
    ident = graph_identity(graph_dir)
    path = graph_dir / f"spectral-r{rank}-a{alpha}.npz" if graph_dir else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["graph"]) == ident:
                return SpectralEmbedding(V=z["V"], U=z["U"], lam=z["lam"], alpha=float(z["alpha"]))
    t0 = time.perf_counter()
    emb = spectral_embedding(W, rank=rank, alpha=alpha)
    log.info("spectral: %d eigenpairs of W (n=%d) in %.1f s", emb.lam.size, W.shape[0], time.perf_counter() - t0)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, V=emb.V, U=emb.U, lam=emb.lam, alpha=np.float64(alpha), graph=np.array(ident))
        write_bytes(buf.getvalue(), path)
    return emb


PRECOMPUTED_FORMAT = 2  # 2: rows in the solver's order, indptr.npz maps items to rows (slot)


def precomputed_cached(W: sp.spmatrix, graph_dir: Path | None, cfg: QueryConfig) -> ItemRows:
    """Every database item's truncated diffusion (`retrieval.precomputed`, the solver of the
    "truncated" method with cfg's truncate_* settings, `precompute_group` items per selection),
    computed once per (graph, settings) and kept in graph_dir as
    precomputed-<key>.{indptr.npz,rows,values,json}: the rows and values are written a chunk at a
    time as they are solved (in the solver's row order; indptr.npz maps items to rows) and
    memory-mapped when read (processes that rank share one copy in the page cache; neither the
    build nor a ranking process holds the table in its own memory). The .json is written last:
    files without it, damaged, or of other settings are computed again. Without graph_dir the rows
    are computed in memory."""
    from retrieval.precomputed import item_row_chunks, item_rows
    from retrieval.truncated_compiled import CompiledTruncatedSolver

    c, n = cfg, W.shape[0]
    settings = dict(m=c.truncate_m, alpha=c.alpha, rtol=c.rtol, maxiter=c.maxiter, hops=c.truncate_hops, beam=c.truncate_beam or None,
                    select_edges=c.truncate_edges)
    key = json.dumps([graph_identity(graph_dir), settings, c.precompute_keep, c.precompute_group, PRECOMPUTED_FORMAT], sort_keys=True,
                     default=str)
    base = graph_dir / f"precomputed-{hashlib.sha256(key.encode()).hexdigest()[:12]}" if graph_dir else None
    if base is not None:
        rows = _read_precomputed(base, key, n)
        if rows is not None:
            return rows
        Path(f"{base}.json").unlink(missing_ok=True)  # a set being rewritten is never read as whole
    t0 = time.perf_counter()
    solver = CompiledTruncatedSolver(W, **settings)
    with tqdm(total=n, desc="precompute", unit="item") as bar:
        if base is None:
            return item_rows(solver, c.precompute_keep, group=c.precompute_group, progress=lambda done: bar.update(done - bar.n))
        indptr, slot = np.zeros(n + 1, np.int64), np.zeros(n, np.int64)

        def stream(rows_tmp: str, values_tmp: str) -> None:
            done = 0
            with open(rows_tmp, "wb") as fr, open(values_tmp, "wb") as fv:
                for items, lengths, cols, vals in item_row_chunks(solver, c.precompute_keep, group=c.precompute_group):
                    fr.write(cols.tobytes())
                    fv.write(vals.tobytes())
                    slot[items] = np.arange(done, done + len(items))
                    indptr[done + 1 : done + 1 + len(lengths)] = indptr[done] + np.cumsum(lengths)
                    done += len(items)
                    bar.update(len(lengths))

        write_with(f"{base}.rows", lambda rt: write_with(f"{base}.values", lambda vt: stream(rt, vt)))
    write_npz(f"{base}.indptr.npz", indptr=indptr, slot=slot)
    write_json({"key": key, "n": n, "nnz": int(indptr[-1])}, f"{base}.json")
    log.info("precomputed: the truncated diffusion of %d items in %.1f s, %d entries (%.0f MB)", n, time.perf_counter() - t0,
             indptr[-1], indptr[-1] * 8 / 1e6)
    rows = _read_precomputed(base, key, n)
    if rows is None:
        raise RuntimeError(f"precomputed: {base.name} could not be read back after it was written")
    return rows


def _read_precomputed(base: Path, key: str, n: int) -> ItemRows | None:
    """The rows kept at `base` when they are whole and of `key` (memory-mapped), else None (a
    warning when they exist but cannot be used)."""
    meta_path = Path(f"{base}.json")
    if not meta_path.is_file():
        return None
    try:
        meta = read_json(meta_path)
        if meta.get("key") != key:
            return None
        with np.load(f"{base}.indptr.npz", allow_pickle=False) as z:
            indptr, slot = z["indptr"], z["slot"]
        nnz = int(meta["nnz"])
        if indptr.shape != (n + 1,) or int(indptr[-1]) != nnz or meta.get("n") != n:
            raise ValueError("its row pointers do not match its description")
        if slot.shape != (n,) or (n and (slot.min() < 0 or slot.max() >= n)):
            raise ValueError("its item-to-row map does not match its description")
        arrays = []
        for suffix, dtype in ((".rows", np.int32), (".values", np.float32)):
            path = Path(f"{base}{suffix}")
            if path.stat().st_size != nnz * np.dtype(dtype).itemsize:
                raise ValueError(f"{path.name} has {path.stat().st_size} bytes, not {nnz * np.dtype(dtype).itemsize}")
            arrays.append(np.asarray(np.memmap(path, dtype=dtype, mode="r")) if nnz else np.zeros(0, dtype))
        return ItemRows(indptr, arrays[0], arrays[1], slot)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("precomputed: %s unreadable (%s): computing it again", base.name, e)
        return None


def row_order_cached(W: sp.spmatrix, graph_dir: Path | None, order: str) -> np.ndarray:
    """Row order (n,) int64 `order` of W for the reordering products: "rcm" computed here (under a
    second at 10^6); "partition" computed once per graph (~30 s at 10^6) and kept in graph_dir."""
    from retrieval.partition_order import row_order

    if order == "rcm" or graph_dir is None:
        return row_order(W, order)
    key = graph_identity(graph_dir)  # a grown or rebuilt graph gets a new order
    path = graph_dir / f"order-{order}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["graph"]) == key and z["perm"].shape == (W.shape[0],):
                    return z["perm"]
        except (OSError, ValueError, KeyError) as e:  # a damaged file is a cache miss
            log.warning("row order: %s unreadable (%s): computing it again", path.name, e)
    t0 = time.perf_counter()
    perm = row_order(W, order)
    log.info("row order: %s of %d nodes in %.1f s", order, W.shape[0], time.perf_counter() - t0)
    buf = io.BytesIO()
    np.savez(buf, perm=perm, graph=np.array(key))
    write_bytes(buf.getvalue(), path)
    return perm


class Rankers:
    """Every method's ranker over one index (X (n, d) float32 rows, the graph W or its folder),
    each built on first use under a lock and kept; `rank(method, Q, topk)` answers a batch.

    The graph is loaded from `graph_dir` the first time a manifold method needs it (or given as W).
    """

    def __init__(self, X: np.ndarray, cfg: QueryConfig, *, graph_dir: Path | None = None, W: sp.spmatrix | None = None):
        self.X, self.cfg = X, cfg
        self.graph_dir = Path(graph_dir) if graph_dir else None
        self._W = W
        self._built: dict[str, Ranker] = {}
        self._lock = threading.Lock()
        self.knn = KnnRanker(X)
        self._built["knn"] = self.knn
        self._seeds_chosen = False  # the seed index (cfg.seed_search) is looked up once, for the first graph method

    @property
    def has_graph(self) -> bool:
        return self._W is not None or (self.graph_dir is not None and (self.graph_dir / "manifest.json").is_file())

    @property
    def W(self) -> sp.csr_matrix:
        """The graph (n, n) CSR, loaded once; ValueError when there is none or it does not fit X."""
        if self._W is None:
            if not self.has_graph:
                raise ValueError("this index has no graph: run the graph stage first")
            from .graph import load_graph

            self._W, _ = load_graph(self.graph_dir)
        if self._W.shape[0] != self.X.shape[0]:
            raise ValueError(f"graph has {self._W.shape[0]} nodes but the database has {self.X.shape[0]} descriptors")
        return self._W

    def _seed_index(self):
        """The approximate index the graph methods seed from, or None (exact seeds): with
        seed_search = "index" the one the graph stage kept, else one built over X now (HNSW with
        the graph stage's default settings) and kept with the graph; with "auto" only a kept one.
        Called under the lock."""
        from .config import GraphConfig
        from .graph import load_search_index

        mode = self.cfg.seed_search
        if mode == "exact":
            return None
        g = GraphConfig()
        spec = IndexSpec(kind="hnsw", hnsw_m=g.hnsw_m, ef_construction=g.ef_construction, ef_search=self.cfg.seed_effort, storage=g.hnsw_storage)
        if self.graph_dir is not None and self.has_graph:
            return load_search_index(self.graph_dir, self.X, effort=self.cfg.seed_effort, build=spec if mode == "index" else None)
        return build_index(self.X, spec) if mode == "index" else None

    def _share_rows(self, index) -> None:
        """When the seed index stores these very rows as plain vectors (HNSW-flat), the rankers
        read its copy (a view) and let their own go: the rows are in memory once (at 10^7 x 128,
        5.1 GB less; the truncated query stage at 10^7 was killed at 23 GB without it). The index
        then owns the rows: it is never reset or grown while the rankers live. Rows compared on a
        sample first; any difference keeps both."""
        rows = stored_vectors(index) if index is not None else None
        if rows is None or rows.shape != self.X.shape:
            return
        probe = np.unique(np.linspace(0, len(rows) - 1, num=min(len(rows), 4096)).astype(np.int64))
        if np.array_equal(rows[probe], self.X[probe]):
            self.X = self.knn.X = rows

    def get(self, method: str) -> Ranker:
        """The ranker of `method` (one of retrieval.rankers.METHODS), built once."""
        if method not in BUILDERS:
            raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
        built = self._built.get(method)
        if built is not None:  # no lock once built: a slow build of another method blocks no one
            return built
        with self._lock:
            if method not in self._built:
                t0 = time.perf_counter()
                if method in GRAPH_METHODS and not self._seeds_chosen:
                    self.knn.seed_index = self._seed_index()
                    self._share_rows(self.knn.seed_index)
                    self._seeds_chosen = True
                self._built[method] = BUILDERS[method](self)
                log.info("rankers: %s built in %.2f s", method, time.perf_counter() - t0)
            return self._built[method]

    def rank(self, method: str, Q: np.ndarray, topk: int, *, regions: list[np.ndarray] | None = None) -> Ranking:
        """Q (nq, d) float32 -> Ranking of database rows; topk <= 0 ranks the whole database.
        The region methods rank the queries' `regions` (per query (R_q, d_r), regionally whitened)."""
        n = self.X.shape[0]
        k = n if topk <= 0 else min(topk, n)
        if method in REGION_METHODS:
            if regions is None or len(regions) != len(Q):
                raise ValueError(f"{method} ranks by the queries' regions: extract the queries with [extract].regions = true")
            return self.get(method).rank_regions(regions, k)
        return self.get(method).rank(Q, k)


def _diffusion(r: Rankers) -> Ranker:
    c = r.cfg
    order = row_order_cached(r.W, r.graph_dir, c.order) if c.matmul in ("compiled", "reordered") else None
    return DiffusionRanker(r.knn, r.X, r.W, alpha=c.alpha, gamma=c.gamma, kq=c.kq, rtol=c.rtol, maxiter=c.maxiter, batch=c.batch,
                           matmul=c.matmul, dtype=np.dtype(c.dtype).type, order=order)


def _truncated(r: Rankers) -> Ranker:
    c = r.cfg  # the truncated kernel keeps RCM: the partition order gained it 4-5% at 10^5, nothing at 10^6 (BENCHMARKS.md)
    return TruncatedRanker(r.knn, r.W, kq=c.kq, m=c.truncate_m, alpha=c.alpha, gamma=c.gamma, rtol=c.rtol, maxiter=c.maxiter,
                           select=c.truncate_select, hops=c.truncate_hops, beam=c.truncate_beam or None, select_edges=c.truncate_edges,
                           kernel=c.truncate_kernel)


def _precomputed(r: Rankers) -> Ranker:
    c = r.cfg
    return PrecomputedRanker(r.knn, precomputed_cached(r.W, r.graph_dir, c), gamma=c.gamma, kq=c.kq)


def _spectral(r: Rankers) -> Ranker:
    c = r.cfg
    emb = spectral_cached(r.W, r.graph_dir, rank=c.spectral_rank, alpha=c.alpha)
    return SpectralRanker(r.knn, emb, gamma=c.gamma, kq=c.kq)


def _petsc(r: Rankers) -> Ranker:
    from cluster.petsc_ranker import PetscRanker

    c = r.cfg
    if r.graph_dir is None or not r.has_graph:
        raise ValueError("petsc: the MPI ranks read the graph's row blocks from its folder: run the graph stage first")
    n = read_json(r.graph_dir / "manifest.json")["n"]
    if n != r.X.shape[0]:  # checked here: the ranks load only their rows, never the whole graph
        raise ValueError(f"graph has {n} nodes but the database has {r.X.shape[0]} descriptors")
    return PetscRanker(r.knn, r.graph_dir, reader=GRAPH_ROWS_READER, ranks=c.petsc_ranks, launch=c.petsc_launch, alpha=c.alpha,
                       gamma=c.gamma, kq=c.kq, rtol=c.rtol, maxiter=c.maxiter)


def _regional(r: Rankers) -> Ranker:
    from retrieval.regional import EXACT_MAX, RegionalDiffusionRanker, region_solver

    from .regions import load_region_index

    c = r.cfg
    if r.graph_dir is None:
        raise ValueError("regional: this index has no run directory with a region index")
    idx = load_region_index(r.graph_dir.parent, graph=c.region_solver != "petsc")
    if len(idx.ids) != r.X.shape[0]:
        raise ValueError(f"the region index has regions of {len(idx.ids)} images but the database has {r.X.shape[0]}: "
                         "run the graph stage again")
    rknn = KnnRanker(idx.V)
    if c.region_solver == "petsc":
        from cluster.petsc_ranker import PetscScores

        solver = PetscScores(r.graph_dir.parent / "regions" / "graph", len(idx.V), reader=GRAPH_ROWS_READER, keep=c.region_keep,
                             ranks=c.petsc_ranks, launch=c.petsc_launch, alpha=c.alpha, gamma=c.gamma, rtol=c.rtol, maxiter=c.maxiter)
        return RegionalDiffusionRanker(rknn, solver, idx.owner, r.X.shape[0], kq=c.kq, pool=c.region_pool)
    if c.region_solver == "auto" and len(idx.V) > EXACT_MAX:
        log.info("regional: %d region nodes: truncated diffusion on %d-node subgraphs (exact up to %d)", len(idx.V), c.truncate_m, EXACT_MAX)
    solver = region_solver(rknn, idx.V, idx.W, alpha=c.alpha, gamma=c.gamma, kq=c.kq, m=c.truncate_m, select=c.truncate_select,
                           solver=c.region_solver, rtol=c.rtol, maxiter=c.maxiter, batch=c.batch, matmul=c.matmul,
                           dtype=np.dtype(c.dtype).type)
    return RegionalDiffusionRanker(rknn, solver, idx.owner, r.X.shape[0], kq=c.kq, pool=c.region_pool)


# the graph-block reader the PETSc ranks import (module:function), so cluster/ never imports pipelines/
GRAPH_ROWS_READER = "pipelines.graph:read_graph_rows"

BUILDERS: dict[str, Callable[[Rankers], Ranker]] = {
    "knn": lambda r: r.knn,
    "aqe": lambda r: AqeRanker(r.knn, r.X, n=r.cfg.aqe_n, alpha=r.cfg.aqe_alpha),
    "diffusion": _diffusion,
    "truncated": _truncated,
    "precomputed": _precomputed,
    "spectral": _spectral,
    "petsc": _petsc,
    "regional": _regional,
}
assert tuple(BUILDERS) == METHODS, "every method of retrieval.rankers.METHODS has exactly one builder"
__all__ = ["BUILDERS", "GRAPH_METHODS", "METHODS", "REGION_METHODS", "Rankers", "row_order_cached", "spectral_cached"]
