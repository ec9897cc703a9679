"""Region index: the database's regional vectors, PCA-whitened, and their reciprocal kNN graph.

Built by the graph stage when the query methods include "regional" (regional diffusion), from the
regional vectors that extraction stores with `[extract].regions = true` (R-MAC grid or FS.EGM
regions, `region_kind`). Writes `regions/`:

- `vectors.npy` (M, d) float32, L2-normalised after the regional whitening; `owner.npy` (M,) int64:
  each region's database row, non-decreasing; `ids.npy` (n,) int64: the image id of each row
  (ascending, as the descriptors' rows);
- `whitening.npz`: the regional PCA-whitening, learned on the database's regions, applied to queries';
- `graph/`: the region graph in the graph stage's own format (CSR row blocks, manifest), built by the
  graph stage's own code (`pipelines.graph.build_graph_sharded`) with the same [graph] settings;
- `manifest.json` last (its `params` make a rerun skip).
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from retrieval.whitening import Whitening, learn_pca_whitening

from .config import ExtractConfig, GraphConfig, params_hash
from .descriptors import load_whitening, save_whitening
from .shards import list_shards, read_json, read_json_or, read_table, write_bytes, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionIndex:
    """V (M, d) float32 whitened regional vectors, owner (M,) int64 rows, ids (n,) int64 image id per
    row, W (M, M) CSR region graph (None when loaded without it), manifest."""

    V: np.ndarray
    owner: np.ndarray
    ids: np.ndarray
    W: sp.csr_matrix | None
    manifest: dict


def _shard_regions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n,) int64, regions per image (n,) int64, regional vectors (sum, C) float32) of one
    features shard, read column-wise (no per-value Python objects)."""
    import pyarrow.parquet as pq

    if "regions" not in pq.read_schema(path).names:
        raise ValueError(f"regions: {path} has no regional vectors: extract with [extract].regions = true")
    t = read_table(path, ["id", "regions"])
    ids = t.column("id").to_numpy().astype(np.int64)
    col = t.column("regions").combine_chunks()
    if col.null_count:
        raise ValueError(f"regions: {path} has images without regional vectors")
    counts = np.diff(np.asarray(col.offsets)).astype(np.int64)
    inner = col.flatten()  # fixed-size lists, one per region
    dim = inner.type.list_size
    vals = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ids, counts, vals.reshape(-1, dim)


def load_regions(out_dir: Path, ids: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(ids, raw regional vectors (R_i, C) float32 per id) from `out_dir/features`: of the images `ids`
    in that order, or of every image there by ascending id. For query sets and tests: the region
    index reads the database shard by shard instead (`run_region_graph`)."""
    regs: dict[int, np.ndarray] = {}
    for p in list_shards(out_dir / "features"):
        sid, counts, R = _shard_regions(p)
        for i, part in zip(sid.tolist(), np.split(R, np.cumsum(counts)[:-1])):
            regs[int(i)] = part
    if ids is None:
        ids = np.array(sorted(regs), np.int64)
    missing = [int(i) for i in ids if int(i) not in regs]
    if missing:
        raise ValueError(f"regions: {len(missing)} images have descriptors but no regional vectors (first: id {missing[0]})")
    return np.asarray(ids, np.int64), [regs[int(i)] for i in ids]


def _whiten(regions: list[np.ndarray], w: Whitening) -> list[np.ndarray]:
    return [w.apply(r).astype(np.float32) for r in regions]


def load_region_whitening(run_dir: Path) -> Whitening:
    return load_whitening(run_dir / "regions" / "whitening.npz")


WHITEN_SAMPLE = 200_000  # regions the regional whitening is learned on: a sample spread over the shards


def _whitened_regions(shards: list[Path], ecfg: ExtractConfig) -> tuple[np.ndarray, np.ndarray, Whitening]:
    """Two passes over the feature shards: learn the regional PCA-whitening on a sample of at most
    WHITEN_SAMPLE regions, then whiten shard by shard into one (M, d) float32 array (memory: the
    whitened regions plus one shard's raw ones). Returns (V in shard order, regions per image, w)."""
    rng = np.random.default_rng(0)
    quota = max(1, WHITEN_SAMPLE // len(shards))
    sample, counts = [], []
    for p in shards:
        _, c, R = _shard_regions(p)
        counts.append(c)
        sample.append(R if len(R) <= quota else R[np.sort(rng.choice(len(R), quota, replace=False))])
    w = learn_pca_whitening(np.concatenate(sample), dim=ecfg.whitening_dim or None, shrinkage=ecfg.whitening_shrinkage)
    del sample
    counts = np.concatenate(counts)
    V = np.empty((int(counts.sum()), w.dim), np.float32)
    at = 0
    for p in shards:
        R = _shard_regions(p)[2]
        V[at : at + len(R)] = w.apply(R)
        at += len(R)
    return V, counts, w


def _by_image_order(R: np.ndarray, counts: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Regions R (sum(counts), d), grouped by image (counts (n,)), with the images put in `order`."""
    if np.array_equal(order, np.arange(len(order))):
        return R, counts
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return R[np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in order])], counts[order]


def _grown(rdir: Path, shards: list[Path], shard_ids: list[np.ndarray], ids: np.ndarray, settings: str, ecfg: ExtractConfig):
    """(V, counts, w, lineage, n0) of the stored region index grown by the images it lacks, or None
    when it must be built again: other settings, `relearn_whitening`, an unreadable index, or a
    collection that did not only grow (its earlier images, ascending, must be the stored ones and
    the new ones must sit in shards of their own). The regional whitening is the stored one."""
    man = read_json_or(rdir / "manifest.json", {})
    if ecfg.relearn_whitening or man.get("settings") != settings or not man.get("lineage"):
        return None
    try:
        ids0 = np.load(rdir / "ids.npy", allow_pickle=False)
        owner0 = np.load(rdir / "owner.npy", allow_pickle=False)
        V0 = np.load(rdir / "vectors.npy", allow_pickle=False)
        w = load_whitening(rdir / "whitening.npz")
    except (OSError, ValueError, KeyError) as e:
        log.warning("regions: the stored index is unreadable (%s): building it again", " ".join(str(e).split())[:200])
        return None
    n0 = len(ids0)
    if not (0 < n0 < len(ids) and np.array_equal(ids[:n0], ids0) and len(owner0) == len(V0)):
        return None
    last = ids0[-1]
    new = [(p, si) for p, si in zip(shards, shard_ids) if len(si) and si.min() > last]
    if sum(len(si) for _, si in new) != len(ids) - n0:
        return None  # new images share a shard with earlier ones
    parts = [_shard_regions(p) for p, _ in new]
    nid = np.concatenate([q[0] for q in parts])
    counts = np.concatenate([q[1] for q in parts])
    R = w.apply(np.concatenate([q[2] for q in parts])).astype(np.float32)
    R, counts = _by_image_order(R, counts, np.argsort(nid, kind="stable"))
    return np.concatenate([V0, R]), np.concatenate([np.bincount(owner0, minlength=n0), counts]), w, str(man["lineage"]), n0


def run_region_graph(run_dir: Path, gcfg: GraphConfig, ecfg: ExtractConfig, *, features: str) -> dict:
    """Build `run_dir/regions/` (see the module docstring) from the regional vectors in
    `run_dir/features` (extracted with `ecfg`, whose parameters hash to `features`: see
    `pipelines.extract.feature_params`); skipped when up to date. When the collection only grew
    (`retrieval add`: appended ids), the index grows instead: the new images' regions are whitened
    with the stored regional whitening and appended, and the region graph is updated, not rebuilt
    (the graph stage's update: equal to a rebuild on these vectors with an exact index). The
    manifest's `lineage` (the parameters of the index's last full build) survives growth: the
    database's OS pass keys its shards by it, so only new images are forwarded again."""
    from .graph import build_graph_sharded, write_graph

    import hashlib

    rdir = run_dir / "regions"
    t0 = time.perf_counter()
    shards = list_shards(run_dir / "features")
    if not shards:
        raise ValueError(f"regions: no feature shards in {run_dir / 'features'}: run the extract stage first")
    shard_ids = [read_table(p, ["id"]).column("id").to_numpy().astype(np.int64) for p in shards]
    ids_in_shards = np.concatenate(shard_ids)
    settings = params_hash({"graph": gcfg, "dim": ecfg.whitening_dim, "shrinkage": ecfg.whitening_shrinkage, "features": features})
    phash = params_hash({"settings": settings, "ids": hashlib.sha256(np.sort(ids_in_shards).tobytes()).hexdigest()[:16]})
    if (rdir / "manifest.json").is_file() and read_json(rdir / "manifest.json").get("params") == phash:
        log.info("regions: up to date, skipping")
        return read_json(rdir / "manifest.json")
    ids = np.sort(ids_in_shards)  # rows follow ascending ids, as the descriptors do
    grown = _grown(rdir, shards, shard_ids, ids, settings, ecfg)
    if grown is not None:
        V, counts, w, lineage, n0 = grown
        log.info("regions: the collection grew from %d to %d images: new regions appended, the region graph updated", n0, len(ids))
    else:
        V, counts, w = _whitened_regions(shards, ecfg)
        lineage, n0 = phash, 0
        V, counts = _by_image_order(V, counts, np.argsort(ids_in_shards, kind="stable"))
    owner = np.repeat(np.arange(len(ids), dtype=np.int64), counts)
    # with the graph's folder, its kNN lists are kept there and a grown index updates them
    W, stats, info = build_graph_sharded(V, gcfg, gdir=rdir / "graph", params=phash)
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "manifest.json").unlink(missing_ok=True)  # the files below change together: no manifest until all are written
    for name, arr in (("vectors.npy", V), ("owner.npy", owner), ("ids.npy", ids)):
        buf = io.BytesIO()
        np.save(buf, arr)
        write_bytes(buf.getvalue(), rdir / name)
    if not n0:
        save_whitening(w, rdir / "whitening.npz", params={"kind": "pca-regions", "dim": ecfg.whitening_dim,
                                                          "shrinkage": ecfg.whitening_shrinkage})
    write_graph(W, rdir / "graph", block_rows=gcfg.block_rows,
                manifest={**info, "n": stats.n, "k": gcfg.k, "gamma": gcfg.gamma, "nnz": stats.nnz, "isolated": stats.isolated,
                          "params": phash, "cfg_hash": params_hash({"cfg": gcfg})})
    n = len(ids)
    manifest = {"format_version": 1, "images": n, "regions": int(len(V)), "dim": int(V.shape[1]), "kind": ecfg.region_kind,
                "regions_per_image": float(len(V) / max(n, 1)), "graph_nnz": stats.nnz, "graph_isolated": stats.isolated,
                "bytes_per_image": float(V.nbytes / max(n, 1)), "graph": {k: info.get(k) for k in ("index", "recall_at_k", "seconds")},
                "seconds": time.perf_counter() - t0, "params": phash, "settings": settings, "lineage": lineage,
                "grown_from_images": n0}
    write_json(manifest, rdir / "manifest.json")
    log.info("regions: %d regions of %d images (%.1f per image, d=%d), graph nnz=%d in %.1f s", len(V), n,
             manifest["regions_per_image"], V.shape[1], stats.nnz, manifest["seconds"])
    return manifest


def load_region_index(run_dir: Path, *, graph: bool = True) -> RegionIndex:
    """The region index in `run_dir/regions`; graph=False leaves the graph on disk (W None: a PETSc
    solve reads its rows in its MPI ranks)."""
    from .graph import load_graph

    rdir = run_dir / "regions"
    if not (rdir / "manifest.json").is_file():
        raise ValueError(f"{rdir} has no region index: run the graph stage with \"regional\" among [query].methods")
    V = np.load(rdir / "vectors.npy", allow_pickle=False)
    owner = np.load(rdir / "owner.npy", allow_pickle=False)
    ids = np.load(rdir / "ids.npy", allow_pickle=False)
    W = load_graph(rdir / "graph")[0] if graph else None
    nodes = W.shape[0] if graph else read_json(rdir / "graph" / "manifest.json")["n"]
    if nodes != len(V) or len(owner) != len(V) or (len(owner) and owner.max() >= len(ids)):
        raise ValueError(f"{rdir}: vectors, owners, ids and graph disagree ({len(V)}, {len(owner)}, {len(ids)}, {nodes})")
    return RegionIndex(V, owner, ids, W, read_json(rdir / "manifest.json"))


def query_regions(query_dir: Path, run_dir: Path, ids: np.ndarray) -> list[np.ndarray]:
    """The queries' regional vectors (in `ids` order), whitened with the database's regional whitening."""
    return _whiten(load_regions(query_dir, ids)[1], load_region_whitening(run_dir))
