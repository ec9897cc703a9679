"""Graph stage: descriptors -> normalised reciprocal kNN graph W stored as CSR row blocks."""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from retrieval.graph import graph_from_knn
from retrieval.ids import ids_dtype
from retrieval.knn import (
    IndexSpec, build_index, knn_search, quantized, read_index, recall_at_k, search_self, set_search_effort, shard_bounds, stored_vectors,
    write_index,
)
from retrieval.knn_update import extend_knn, extend_knn_searched, grown_lists
from retrieval.row_blocks import exact_topk

from .config import GraphConfig, params_hash
from .descriptors import load_descriptors
from .knn_lists import UNREADABLE, first_line, rows_hashes, save_knn, saved_header
from .row_file import RowFile
from .shards import read_json, read_json_or, write_bytes, write_json, write_with

log = logging.getLogger(__name__)


def write_graph(W: sp.csr_matrix, folder: Path, *, block_rows: int, manifest: dict) -> None:
    """Row blocks `block-XXXXX.npz` (indptr, indices, data, row_start, n) then `manifest.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("block-*.npz"):
        old.unlink()
    n = W.shape[0]
    blocks = []
    for b, start in enumerate(range(0, n, block_rows)):
        stop = min(start + block_rows, n)
        blk = W[start:stop]
        buf = io.BytesIO()
        np.savez(buf, indptr=blk.indptr.astype(np.int64), indices=blk.indices.astype(np.int64), data=blk.data.astype(np.float32),
                 row_start=np.int64(start), n=np.int64(n))
        name = f"block-{b:05d}.npz"
        write_bytes(buf.getvalue(), folder / name)
        blocks.append({"file": name, "row_start": start, "row_stop": stop, "nnz": int(blk.nnz)})
    write_json({**manifest, "blocks": blocks}, folder / "manifest.json")


def read_graph_block(path: Path) -> tuple[int, sp.csr_matrix]:
    """One row block: (row_start, (rows, n) CSR)."""
    with np.load(path, allow_pickle=False) as z:
        indptr, n = z["indptr"], int(z["n"])
        return int(z["row_start"]), sp.csr_matrix((z["data"], z["indices"], indptr), shape=(len(indptr) - 1, n))


def read_graph_rows(folder: str | Path, r0: int = 0, r1: int | None = None) -> sp.csr_matrix:
    """Rows [r0, r1) of W ((r1 - r0, n) CSR, float32, global columns) from only the row blocks
    that overlap them: what one distributed rank loads. r1 = None: to the last row."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    n = int(manifest["n"])
    r1 = n if r1 is None else r1
    parts = []
    for b in sorted(manifest["blocks"], key=lambda b: b["row_start"]):
        s, e = b["row_start"], b["row_stop"]
        if e <= r0 or s >= r1:
            continue
        start, blk = read_graph_block(folder / b["file"])
        if start != s or blk.shape != (e - s, n):
            raise ValueError(f"graph block {folder / b['file']} does not match its manifest entry")
        parts.append(blk[max(r0, s) - s : min(r1, e) - s])
    if not parts:
        return sp.csr_matrix((r1 - r0, n), dtype=np.float32)
    return sp.vstack(parts, format="csr")


def load_graph(folder: Path) -> tuple[sp.csr_matrix, dict]:
    """Whole W (n, n) float32 CSR from its row blocks, and the manifest."""
    manifest = read_json(folder / "manifest.json")
    W = read_graph_rows(folder)
    if W.shape != (manifest["n"], manifest["n"]) or W.nnz != manifest["nnz"]:
        raise ValueError(f"graph in {folder} does not match its manifest (shape {W.shape}, nnz {W.nnz})")
    return W, manifest


SEARCH_INDEX = "search-index.faiss"  # an approximate index over the graph's rows, kept for the seeds of new queries
SEARCH_INDEX_META = "search-index.json"


def save_search_index(folder: Path, index, spec: IndexSpec, graph_params: str) -> None:
    """Keep `index` (over the rows of the graph whose manifest params are `graph_params`) in
    `folder`: the file, then its description (so a half-written pair never matches a graph)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_with(folder / SEARCH_INDEX, lambda tmp: write_index(index, tmp))
    write_json({"graph": graph_params, "n": int(index.ntotal), "d": int(index.d), "kind": spec.kind,
                "hnsw": {"M": spec.hnsw_m, "efConstruction": spec.ef_construction} if spec.kind == "hnsw" else None,
                "nlist": spec.nlist if spec.kind == "ivf" else None}, folder / SEARCH_INDEX_META)


def load_search_index(folder: Path, X: np.ndarray, *, effort: int, build: IndexSpec | None = None):
    """The approximate index kept with the graph in `folder` (over the rows of X), searching with
    `effort` (HNSW efSearch / IVF nprobe). When none is kept for this graph, `build` (an HNSW or
    IVF spec) builds one over X and keeps it there for the next time; without `build`, None."""
    manifest = read_json(folder / "manifest.json")
    meta = read_json_or(folder / SEARCH_INDEX_META, {})
    index = None
    if (meta.get("graph") == manifest.get("params") and meta.get("n") == X.shape[0] and meta.get("d") == X.shape[1]
            and (folder / SEARCH_INDEX).is_file()):
        try:
            index = read_index(folder / SEARCH_INDEX)
        except (RuntimeError, OSError) as e:  # a damaged file is a cache miss, not a failed query
            log.warning("graph: the kept search index %s is unreadable (%s); %s", folder / SEARCH_INDEX, first_line(e),
                        "building it again" if build is not None else "seeding by exact search")
        if index is not None and (index.ntotal != X.shape[0] or index.d != X.shape[1]):
            log.warning("graph: the kept search index %s does not match the database; ignoring it", folder / SEARCH_INDEX)
            index = None
    if index is None and build is not None:
        t0 = time.perf_counter()
        spec = build.resolve(X.shape[0])
        index = build_index(X, spec)
        log.info("graph: built a %s index over %d rows for the seeds of new queries in %.1f s (kept in %s)", spec.kind, X.shape[0],
                 time.perf_counter() - t0, folder)
        save_search_index(folder, index, spec, manifest.get("params"))
    if index is not None:
        set_search_effort(index, effort)
    return index


def index_spec(cfg: GraphConfig, n: int) -> IndexSpec:
    """The faiss index the graph stage's settings choose for n rows."""
    return IndexSpec(kind=cfg.index, nlist=cfg.nlist, nprobe=cfg.nprobe, hnsw_m=cfg.hnsw_m, ef_construction=cfg.ef_construction,
                     ef_search=cfg.ef_search, storage=cfg.hnsw_storage).resolve(n)


def _self_index(X: np.ndarray, cfg: GraphConfig):
    """(index, spec, seconds): the configured faiss index over the rows of X."""
    if cfg.engine not in ("local", "ray"):
        raise ValueError(f"graph: unknown engine {cfg.engine!r}; expected local or ray")
    spec = index_spec(cfg, X.shape[0])
    t0 = time.perf_counter()
    index = build_index(X, spec)
    return index, spec, time.perf_counter() - t0


def _search_self(index, X: np.ndarray, spec: IndexSpec, cfg: GraphConfig, *, keep=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Self-kNN lists (n, k+1) of the rows of X against `index`: float32 similarities, int32 ids
    (int64 past 2^31 rows); the recall of an approximate index on a sample; keep(index, spec) for
    an approximate one."""
    from tqdm import tqdm

    n = X.shape[0]
    t0 = time.perf_counter()
    bounds = shard_bounds(n, cfg.shards)
    k = cfg.k + 1
    with tqdm(total=n, desc="graph knn", unit="row") as bar:
        if cfg.engine == "ray":
            from cluster.ray_graph import search_shards_ray

            D, I = search_shards_ray(index, X, bounds, k, progress=bar.update)
        else:
            D, I = search_self(index, X, k, bounds, progress=bar.update, ids=ids_dtype(n))
    info = {"index": spec.kind, "nlist": spec.nlist if spec.kind == "ivf" else None,
            "nprobe": spec.nprobe if spec.kind == "ivf" else None,
            "hnsw": _hnsw_info(spec) if spec.kind == "hnsw" else None,
            "shards": len(bounds), "engine": cfg.engine, "seconds_search": time.perf_counter() - t0}
    if spec.kind != "flat":
        info.update(_sample_recall(X, I, cfg))
    t_keep = time.perf_counter()
    if keep is not None and spec.kind != "flat":
        keep(index, spec)
    info["seconds_keep_index"] = time.perf_counter() - t_keep
    return D, I, info


def build_graph_sharded(X, cfg: GraphConfig, *, gdir: Path | None = None, params: str = ""):
    """(W, stats, info): reciprocal kNN graph from the sharded self-kNN. With `gdir` (the graph
    stage's folder), the kNN lists saved there are updated when the collection only grew, and the
    new lists are saved there for the next time; an approximate index is kept there too (for the
    graph whose manifest will carry `params`), as the seed index of new queries.

    X: the rows (n, d) float32, or a function that loads them: then they live only as long as
    they are needed, and a flat or HNSW index's own copy serves as the queries of its search, so
    the rows are in memory once (at 10^6 x 128, 0.5 GB less at the peak); a quantized index's
    search (the local engine, with `gdir`) reads them from a scratch file there instead, a block at
    a time (`pipelines.row_file`), so that they are not in memory beside the index and the lists
    (0.48 GiB less at 10^6 x 128). The lists are saved before the graph is built in their arrays."""
    t0 = time.perf_counter()
    load = X if callable(X) else (lambda rows=X: rows)
    D, I, info, n, rows_hash = _knn_lists(load, cfg, gdir, params, owned=callable(X))
    if gdir is not None:  # the lists are saved first: the graph is then built in their arrays (O(n k) less memory)
        gdir.mkdir(parents=True, exist_ok=True)
        save_knn(gdir, D, I, n, rows_hash)
    W, stats = graph_from_knn(D, I, gamma=cfg.gamma, reciprocal=cfg.reciprocal, overwrite=True)
    del D, I
    info["seconds"] = time.perf_counter() - t0
    return W, stats, info


def _knn_lists(load, cfg: GraphConfig, gdir: Path | None, params: str, *, owned: bool = False):
    """(D, I, info, n, rows hash) for build_graph_sharded: the rows loaded here, hashed, updated
    from saved lists or searched; the loaded array is dropped once an index holds the rows."""
    X = load()
    n = X.shape[0]
    header = saved_header(gdir) if gdir is not None else None
    hashes = rows_hashes(X, [n, header[0] if header else 0]) if gdir is not None else {}
    rows_hash = hashes.get(n, "")
    saved = _saved_lists(gdir, X, cfg, header, hashes) if header is not None else None
    if saved is not None:
        n0, index, spec = saved
        t0 = time.perf_counter()
        on_disk = _rows_to_disk(X, index, cfg, gdir, owned)  # a quantized index's rows: on disk before the index grows
        X = X if on_disk is None else on_disk
        if index is not None:
            new_rows = np.array(X[n0:], dtype=np.float32, order="C")
            if stored_vectors(index) is not None:  # the index stores plain vectors: the loaded rows go before it grows
                X = None
            index.add(new_rows)
            del new_rows
            X = stored_vectors(index) if X is None else X  # the index's copy (a view)
        try:
            with np.load(gdir / "knn.npz", allow_pickle=False) as z:  # read after the index grew: its growth copies its storage
                D, I = grown_lists(lambda: z["D"], lambda: z["I"], n)  # one old array at a time
        except UNREADABLE as e:
            log.warning("graph: the saved kNN lists %s are unreadable (%s): building the graph again", gdir / "knn.npz", first_line(e))
            _remove(on_disk)
            del X, index
            X = load()
        else:
            try:
                info = _update_lists(D, I, X, n0, index, spec, cfg, t0)
            finally:
                _remove(on_disk)
            if index is not None:
                t_keep = time.perf_counter()
                save_search_index(gdir, index, spec, params)
                info["seconds_keep_index"] = time.perf_counter() - t_keep
            del X, index
            return D, I, {**info, "rows_on_disk": on_disk is not None}, n, rows_hash
    keep = (lambda index, spec: save_search_index(gdir, index, spec, params)) if gdir is not None else None
    index, spec, t_index = _self_index(X, cfg)
    stored, on_disk = stored_vectors(index), _rows_to_disk(X, index, cfg, gdir, owned)
    if stored is not None:
        X = stored  # the index's copy (a view): the loaded array's last reference goes here
    elif on_disk is not None:
        X = on_disk  # the float rows re-score the lists from disk, a block at a time
    try:
        D, I, info = _search_self(index, X, spec, cfg, keep=keep)
    finally:
        _remove(on_disk)
    del X, stored, index  # the view dies with its index
    return D, I, {**info, "seconds_index": t_index, "rows_on_disk": on_disk is not None}, n, rows_hash


def _rows_to_disk(X: np.ndarray, index, cfg: GraphConfig, gdir: Path | None, owned: bool) -> RowFile | None:
    """The rows X (loaded by this stage: `owned`) written to a scratch file in `gdir` and opened,
    when a quantized index (which keeps no float rows) is searched by the local engine: its lists
    are then re-scored on rows read a block at a time, not held beside the index and the lists
    (at 10^6 x 128, 0.48 GiB). None otherwise: the rows stay where they are."""
    if not (owned and index is not None and quantized(index) and cfg.engine == "local" and gdir is not None):
        return None
    gdir.mkdir(parents=True, exist_ok=True)
    return RowFile.create(gdir / ROWS_SCRATCH, X)


def _remove(rows: RowFile | None) -> None:
    if rows is not None:
        rows.close()
        rows.path.unlink(missing_ok=True)


ROWS_SCRATCH = "rows.tmp.npy"  # the float rows while a quantized index's lists are re-scored (deleted after)
REVERSE_WIDTH = 2  # an approximate update searches each new row for 2 (k + 1) neighbours: the old rows it enters (BENCHMARKS.md)


def _saved_lists(gdir: Path, X: np.ndarray, cfg: GraphConfig, header: tuple[int, str, set], hashes: dict[int, str]):
    """(n_old, index, spec) when the graph in `gdir` can be updated to the rows of X rather than
    built again (the collection grew by appended ids, the first rows unchanged: `hashes` of X's
    first rows against the saved lists' `header`; same graph settings; full lists; an approximate
    index: the one kept with that graph, read here; None for an exact one). None otherwise."""
    man = read_json_or(gdir / "manifest.json", {})
    spec = index_spec(cfg, len(X))
    if man.get("cfg_hash") != params_hash({"cfg": cfg}):
        return None
    if spec.kind != "flat":
        meta = read_json_or(gdir / SEARCH_INDEX_META, {})
        if not (meta.get("graph") == man.get("params") and meta.get("d") == X.shape[1] and meta.get("kind") == spec.kind
                and (gdir / SEARCH_INDEX).is_file()):
            return None
    n0, h0, shapes = header
    if not 0 < n0 < len(X) or hashes.get(n0) != h0 or shapes != {(n0, cfg.k + 1)}:
        return None  # other rows, or lists shorter than k + 1 (a collection smaller than k): built again
    if spec.kind == "flat":
        return n0, None, spec
    try:
        index = read_index(gdir / SEARCH_INDEX)
    except (RuntimeError, OSError) as e:
        log.warning("graph: the kept index %s is unreadable (%s): building the graph again", gdir / SEARCH_INDEX, first_line(e))
        return None
    if index.ntotal != n0 or index.d != X.shape[1]:
        return None
    return n0, index, spec


def _update_lists(D: np.ndarray, I: np.ndarray, X: np.ndarray, n0: int, index, spec: IndexSpec, cfg: GraphConfig, t0: float) -> dict:
    """Fill the lists of a grown collection in place (see `_saved_lists`): exact, one product of
    the new rows with all (equal to a rebuild); approximate (`index` already holding all rows),
    the new rows searched there and the old lists merged with their reverse neighbours, recall
    measured like a build's. Returns the manifest's info."""
    from tqdm import tqdm

    info = {"index": spec.kind, "engine": "local", "updated_from_rows": n0}
    new = len(X) - n0
    if index is None:
        with tqdm(total=new, desc="graph update", unit="row") as bar:
            changed = extend_knn(D, I, X, n0, progress=bar.update)
    else:
        info["hnsw" if spec.kind == "hnsw" else "nprobe"] = _hnsw_info(spec) if spec.kind == "hnsw" else spec.nprobe
        info["seconds_index"] = time.perf_counter() - t0
        set_search_effort(index, spec.ef_search if spec.kind == "hnsw" else spec.nprobe)
        with tqdm(total=new, desc="graph update", unit="row") as bar:
            Dn, In = search_self(index, X[n0:], REVERSE_WIDTH * (cfg.k + 1), shard_bounds(new, cfg.shards), first=n0, database=X,
                                 progress=bar.update, ids=I.dtype.type)
        changed = extend_knn_searched(D, I, n0, Dn, In)
        del Dn, In
        info.update(_sample_recall(X, I, cfg))
    info["seconds_search"] = time.perf_counter() - t0
    info["updated_rows"] = changed
    log.info("graph: the collection grew from %d to %d rows: kNN lists updated, not rebuilt (%s index; %d old lists took new rows)",
             n0, len(X), spec.kind, changed)
    return info


def _hnsw_info(spec: IndexSpec) -> dict:
    return {"M": spec.hnsw_m, "efConstruction": spec.ef_construction, "efSearch": spec.ef_search, "storage": spec.storage}


def _sample_recall(X: np.ndarray, I: np.ndarray, cfg: GraphConfig) -> dict:
    """Recall@(k+1) of approximate self-kNN lists I against an exact search, on a sample of rows."""
    if cfg.recall_sample <= 0:
        return {}
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(X), min(cfg.recall_sample, len(X)), replace=False))
    _, Iref = exact_topk(np.ascontiguousarray(X[rows], dtype=np.float32), X, I.shape[1], knn_search)  # a block of X at a time
    recall = recall_at_k(I[rows], Iref)
    log.info("graph: recall@%d = %.4f on %d rows", I.shape[1], recall, rows.size)
    return {"recall_at_k": recall, "recall_sample": int(rows.size)}


def run_graph(run_dir: Path, cfg: GraphConfig) -> dict:
    """Build the graph of `run_dir/descriptors` into `run_dir/graph`; skipped when up to date, and
    updated rather than rebuilt when the collection only grew (appended ids, unchanged earlier
    descriptors, same settings, exact index): equal to a rebuild."""
    desc_manifest = read_json(run_dir / "manifest.json")
    phash = params_hash({"cfg": cfg, "descriptors": desc_manifest.get("descriptors_sha256_16")})
    gdir = run_dir / "graph"
    (gdir / ROWS_SCRATCH).unlink(missing_ok=True)  # a killed search's scratch rows (n x d x 4 bytes): never read again
    if (gdir / "manifest.json").is_file() and read_json(gdir / "manifest.json").get("params") == phash:
        log.info("graph: up to date, skipping")
        return read_json(gdir / "manifest.json")
    # graph rows follow ascending ids; the rows are loaded inside, so that they can be dropped there
    W, stats, info = build_graph_sharded(lambda: load_descriptors(run_dir / "descriptors", dense=False, keys=False)[2], cfg, gdir=gdir,
                                         params=phash)
    if read_json_or(gdir / SEARCH_INDEX_META, {}).get("graph") != phash:  # an earlier graph's seed index: of no use to this one
        for name in (SEARCH_INDEX_META, SEARCH_INDEX):
            (gdir / name).unlink(missing_ok=True)
    dt = info["seconds"]
    manifest = {
        **info,
        "format_version": 1,
        "n": stats.n,
        "k": cfg.k,
        "gamma": cfg.gamma,
        "reciprocal": cfg.reciprocal,
        "nnz": stats.nnz,
        "isolated": stats.isolated,
        "degree": {"min": stats.degree_min, "mean": stats.degree_mean, "max": stats.degree_max},
        "seconds": dt,
        "params": phash,
        "cfg_hash": params_hash({"cfg": cfg}),
    }
    write_graph(W, gdir, block_rows=cfg.block_rows, manifest=manifest)
    log.info("graph: n=%d k=%d nnz=%d isolated=%d in %.2f s", stats.n, cfg.k, stats.nnz, stats.isolated, dt)
    if stats.isolated:
        log.warning("graph: %d of %d images have no mutual neighbour among their %d nearest (diffusion cannot reach them and "
                    "ranks them by similarity only)%s", stats.isolated, stats.n, cfg.k,
                    f"; k = {cfg.k} is large for {stats.n} images: try [graph].k = {max(2, min(cfg.k, stats.n // 4))}"
                    if cfg.k > stats.n // 4 else "")
    return manifest
