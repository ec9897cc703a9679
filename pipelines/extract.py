"""Extract stage: image shards -> pooled CNN features -> whitened descriptor shards.

`features/part-*.parquet` holds the raw pooled, L2-normalised vectors (one shard per image shard,
written atomically as each completes, skipped on rerun); `descriptors/part-*.parquet` holds the
final vectors after whitening learned on the database (`whitening.npz`), and `manifest.json`
records backbone, weights hash, pooling, sizes, whitening and dimension.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from retrieval.whitening import Whitening, l2_normalize, learn_lw_whitening, learn_pca_whitening

from .config import WHITENINGS, ExtractConfig, GraphConfig, params_hash
from .descriptors import load_descriptors, load_whitening, save_whitening, write_descriptors
from .extractor import DescriptorExtractor
from .shards import list_shards, read_table, shard_done, write_json, write_table

EXTRACT_REJECT_SCHEMA = pa.schema([("id", pa.int64()), ("key", pa.string()), ("reason", pa.string())])

log = logging.getLogger(__name__)
ShardResult = tuple[Path, np.ndarray, np.ndarray, dict]


def feature_params(cfg: ExtractConfig) -> str:
    keys = ("backbone", "weights", "pooling", "gem_p", "max_side", "scales", "scale_p", "regions")
    params = {k: getattr(cfg, k) for k in keys}
    if cfg.regions and cfg.region_kind != "rmac":  # absent when default, so earlier runs' shards stay valid
        params["region_kind"] = cfg.region_kind
    if cfg.pooling in ("fs_egm", "os_egm") and cfg.egm_weighting != "equal":
        params["egm_weighting"] = cfg.egm_weighting
    return params_hash(params)


def local_engine(shards: list[Path], make_extractor: Callable, *, with_boxes: bool, progress, cfg: ExtractConfig,
                 clocks: list) -> Iterator[ShardResult]:
    """In-process reference engine: one extractor, shards in order. Yields (shard, ids, vectors,
    extra) where extra may hold "regions"/"region_boxes" and "rejects" [(id, reason)]. When all is
    done an engine appends to `clocks` each of its extractors' (before, after) `forward_clock()`
    readings, where it can read them (`model_rate`; Ray Data's anonymous actors cannot)."""
    from .decode import prepare

    extractor = make_extractor()
    before = _clock(extractor)
    for p in shards:
        t = read_table(p, ["id", "image"] + (["bbox"] if with_boxes else []))
        all_ids = t.column("id").to_numpy().astype(np.int64)
        boxes = t.column("bbox").to_pylist() if with_boxes else [None] * len(all_ids)
        imgs = t.column("image").to_pylist()
        ok_ids, vecs, regs, rboxes, rejects = [], [], [], [], []
        for i in range(0, len(imgs), cfg.batch_size):
            pix, geo = [], []
            for j in range(i, min(i + cfg.batch_size, len(imgs))):
                try:
                    px, g = prepare(imgs[j], boxes[j], cfg)
                except (ValueError, OSError) as e:
                    rejects.append((int(all_ids[j]), f"cannot decode at extract: {e}"))
                    continue
                pix.append(px)
                geo.append(g)
                ok_ids.append(int(all_ids[j]))
            if pix:
                r = extractor.embed(pix, geo, ids=ok_ids[len(ok_ids) - len(pix):])
                vecs.append(r["vector"])
                regs += r.get("regions", [])
                rboxes += r.get("region_boxes", [])
            progress(min(i + cfg.batch_size, len(imgs)) - i)
        V = np.concatenate(vecs) if vecs else np.zeros((0, extractor.dim), np.float32)
        extra = {"rejects": rejects}
        if cfg.regions:
            extra.update(regions=regs, region_boxes=rboxes)
        yield p, np.array(ok_ids, np.int64), V, extra
    clocks.append((before, _clock(extractor)))


def _clock(extractor) -> tuple[float, int] | None:
    clock = getattr(extractor, "forward_clock", None)
    return clock() if clock else None


def model_rate(clocks: list) -> float | None:
    """Images/s the extraction's model passes alone reached while it ran: the sum over its extractors
    (side by side) of images over CPU seconds in the forward pass between their (before, after)
    `forward_clock()` readings. None when a reading is missing (Ray Data's anonymous actors, a GPU,
    torch on several threads) or inconsistent (an actor restarted between them)."""
    rate = 0.0
    for before, after in clocks:
        if before is None or after is None:
            return None
        sec, n = after[0] - before[0], after[1] - before[1]
        if n < 0 or sec < 0:
            return None
        rate += n / sec if n and sec > 0 else 0.0
    return rate if rate > 0 else None


def default_extractor(cfg: ExtractConfig) -> Callable[[], DescriptorExtractor]:
    """What builds the extractor in each worker unless a stage passes its own."""
    return functools.partial(DescriptorExtractor, cfg)


def decoder(cfg: ExtractConfig) -> Callable:
    """`prepare(bytes, bbox)` for `cfg`, as the Ray engines' workers decode (the warm actors' key
    includes it: the warm-up and the extraction must build it alike)."""
    from .decode import prepare

    return functools.partial(prepare, cfg=cfg)


def ray_engine(shards: list[Path], make_extractor: Callable, *, with_boxes: bool, progress, cfg: ExtractConfig,
               clocks: list) -> Iterator[ShardResult]:
    """Ray Data's pipeline (its actors are anonymous: no `clocks` readings)."""
    from cluster.extract_actors import stop_pool
    from cluster.ray_extract import extract_shards_ray

    stop_pool()  # model actors kept by the ray_actors engine would hold the CPUs Ray Data's read tasks need
    yield from extract_shards_ray(
        shards,
        make_extractor,
        prepare=decoder(cfg),
        decode_num_cpus=cfg.decode_num_cpus,
        actors=cfg.actors,
        num_cpus=cfg.actor_num_cpus,
        batch_size=cfg.batch_size,
        with_boxes=with_boxes,
        progress=progress,
    )


def ray_actors_engine(shards: list[Path], make_extractor: Callable, *, with_boxes: bool, progress, cfg: ExtractConfig,
                      clocks: list) -> Iterator[ShardResult]:
    from cluster.extract_actors import extract_shards_actors

    yield from extract_shards_actors(
        shards, make_extractor, prepare=decoder(cfg), actors=cfg.actors, num_cpus=cfg.actor_num_cpus,
        batch_size=cfg.batch_size, with_boxes=with_boxes, keep=cfg.keep_actors, progress=progress, clocks=clocks,
    )


def warm_model_actors(cfg: ExtractConfig) -> list[int]:
    """Start the ray_actors engine's model actors for the extraction `cfg` runs first (the FS.EGM pass
    for os_egm), kept in the cluster, and wait until they are built: a later extract stage on this
    Ray finds them warm. Returns their process ids."""
    from cluster.extract_actors import warm_pool

    if cfg.pooling == "os_egm":
        from .discover import first_pass

        cfg = first_pass(cfg)
    return warm_pool(default_extractor(cfg), decoder(cfg), actors=cfg.actors, num_cpus=cfg.actor_num_cpus)


ENGINES = {"local": local_engine, "ray": ray_engine, "ray_actors": ray_actors_engine}


def extract_features(images_dir: Path, out_dir: Path, cfg: ExtractConfig, *, with_boxes: bool = False, make: Callable | None = None,
                     folder: str = "features", extra_params: str = "") -> dict:
    """Raw pooled features for every image shard not already done into `out_dir/folder`; returns a
    summary. `make` builds the extractor in each worker (default: `DescriptorExtractor(cfg)`);
    `extra_params` joins the shards' parameters (what else the features depend on)."""
    # fail fast in the driver, before any worker starts, on weights that are missing or unreadable
    # (engine and backbone names are checked when the configuration loads)
    from .models import resolve_weights

    resolve_weights(cfg.weights, cfg.backbone)
    shards = list_shards(images_dir)
    if not shards:
        raise FileNotFoundError(f"extract: no image shards in {images_dir}; run `retrieval ingest` first")
    fdir = out_dir / folder
    phash = feature_params(cfg) + (f"+{extra_params}" if extra_params else "")
    todo = [p for p in shards if not (shard_done(fdir / p.name, params=f"{phash}:{p.name}")
                                      and shard_done(fdir / "rejects" / p.name, params=f"{phash}:{p.name}"))]
    log.info("extract: %d of %d shards to do (engine=%s)", len(todo), len(shards), cfg.engine)
    total = sum(read_table(p, ["id"]).num_rows for p in todo)
    t0 = time.perf_counter()
    make = make or default_extractor(cfg)
    first: list[tuple[float, int]] = []  # (seconds, images) at the first descriptors out: start-up cost
    clocks: list = []  # the extractors' forward clocks before and after (`model_rate`)

    with tqdm(total=total, desc="extract", unit="img") as bar:
        def progress(n: int) -> None:
            if not first:
                first.append((time.perf_counter() - t0, n))
            bar.update(n)

        for path, ids, vecs, extra in ENGINES[cfg.engine](todo, make, with_boxes=with_boxes, progress=progress, cfg=cfg, clocks=clocks):
            src = read_table(path, ["id", "key"])
            keys, src_ids = src.column("key").to_pylist(), src.column("id").to_numpy()
            rejects = extra.get("rejects", [])
            if not np.array_equal(np.sort(np.concatenate([ids, np.array([r[0] for r in rejects], np.int64)])), np.sort(src_ids)):
                raise RuntimeError(f"extract: ids returned for {path.name} do not match the shard")
            key_of = dict(zip(src_ids.tolist(), keys))
            # the shard's rejects first, then its features: a features shard never exists without them
            write_table(pa.table({"id": pa.array([r[0] for r in rejects], pa.int64()), "key": [key_of[r[0]] for r in rejects],
                                  "reason": [r[1] for r in rejects]}, schema=EXTRACT_REJECT_SCHEMA),
                        fdir / "rejects" / path.name, params=f"{phash}:{path.name}")
            write_descriptors(fdir / path.name, ids, [key_of[i] for i in ids.tolist()], vecs, params=f"{phash}:{path.name}",
                              regions={k: extra[k] for k in ("regions", "region_boxes")} if "regions" in extra else None)
    dt = time.perf_counter() - t0
    for stale in list_shards(fdir) + list_shards(fdir / "rejects"):
        if stale.name not in {p.name for p in shards}:
            stale.unlink()
    rej = [read_table(p) for p in list_shards(fdir / "rejects")]
    rej_t = pa.concat_tables(rej) if rej else EXTRACT_REJECT_SCHEMA.empty_table()
    write_table(rej_t.replace_schema_metadata(None), out_dir / "extract_rejects.parquet", params=phash)
    for k, r in zip(rej_t.column("key").to_pylist()[:20], rej_t.column("reason").to_pylist()[:20]):
        log.warning("extract: rejected %s: %s", k, r)
    model = model_rate(clocks)
    log.info("extract: %d images in %.1f s (%.1f img/s; the model's forward passes alone %s img/s meanwhile), %d rejects", total, dt,
             total / dt if dt > 0 and total else 0.0, f"{model:.1f}" if model else "-", len(rej_t))
    start_s, start_n = first[0] if first else (dt, total)
    steady = (total - start_n) / (dt - start_s) if dt > start_s and total > start_n else None
    return {"images": total, "seconds": dt, "params": phash, "rejects": len(rej_t), "first_result_s": start_s,
            "steady_img_s": steady, "model_img_s": model, "shards": [p.name for p in todo]}


def _features_hash(ids: np.ndarray, F: np.ndarray, n: int) -> str:
    """Hash of the first n (id, feature) rows."""
    return hashlib.sha256(np.ascontiguousarray(ids[:n]).tobytes() + np.ascontiguousarray(F[:n]).tobytes()).hexdigest()[:16]


def _literal(text: str | None):
    import ast

    try:
        return ast.literal_eval(text) if text else None
    except (ValueError, SyntaxError):
        return None


def whitening_params(path: Path) -> str | None:
    """The params a saved whitening was learned with (repr of a dict), or None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["params"]) if "params" in z.files else None
    except (OSError, ValueError, KeyError):
        return None


def learn_whitening(F: np.ndarray, cfg: ExtractConfig) -> Whitening:
    """PCA-whitening, or learned whitening on mutual nearest-neighbour pairs mined without labels."""
    if cfg.whitening == "pca":
        return learn_pca_whitening(F, dim=cfg.whitening_dim, shrinkage=cfg.whitening_shrinkage)
    from retrieval.graph import mutual_nn_pairs
    from retrieval.knn import knn_search

    _, I = knn_search(F, F, 2)
    pairs = mutual_nn_pairs(I)
    if len(pairs) < 2:
        raise ValueError("extract: too few mutual nearest-neighbour pairs to learn whitening; use whitening = 'pca'")
    log.info("extract: %d mutual nearest-neighbour pairs mined for learned whitening", len(pairs))
    return learn_lw_whitening(F, pairs, dim=cfg.whitening_dim, shrinkage=cfg.whitening_shrinkage)


def regionally_whitened(out_dir: Path, ids: np.ndarray, cfg: ExtractConfig, *, learn: bool, run_dir: Path | None) -> np.ndarray:
    """R-MAC vectors rebuilt from the stored regional vectors, each PCA-whitened before the sum.

    The regional whitening is learned on the database's regions (`region_whitening.npz`) and
    applied unchanged to queries (`run_dir` = the database run)."""
    from retrieval.whitening import aggregate_regions

    if not cfg.regions:
        raise ValueError("extract: region_whitening needs regions = true")
    regs: dict[int, np.ndarray] = {}
    for p in list_shards(out_dir / "features"):
        t = read_table(p, ["id", "regions"])
        for i, r in zip(t.column("id").to_pylist(), t.column("regions").to_pylist()):
            regs[i] = np.asarray(r, dtype=np.float32)
    regions = [regs[int(i)] for i in ids]
    rpath = (run_dir or out_dir) / "region_whitening.npz"
    if learn:
        rw = learn_pca_whitening(np.concatenate(regions), dim=None, shrinkage=cfg.whitening_shrinkage)
        save_whitening(rw, rpath, params={"kind": "pca-regions", "shrinkage": cfg.whitening_shrinkage})
        log.info("extract: regional PCA-whitening learned on %d regions", sum(len(r) for r in regions))
    else:
        rw = load_whitening(rpath)
    return aggregate_regions(regions, rw)


def finalize_descriptors(out_dir: Path, cfg: ExtractConfig, *, whitening: Whitening | None = None, learn: bool = True,
                         run_dir: Path | None = None, features: str = "features") -> dict:
    """features (or `features` folder) -> descriptors: learn (database) or apply (queries) whitening,
    L2, write shards."""
    ids, keys, F = load_descriptors(out_dir / features, dense=False)
    if cfg.region_whitening:
        F = regionally_whitened(out_dir, ids, cfg, learn=learn, run_dir=run_dir)
    wpath = out_dir / "whitening.npz"
    if cfg.whitening not in WHITENINGS:  # a config built in code: learn_whitening would silently take "lw"
        raise ValueError(f"extract: unknown whitening {cfg.whitening!r}; expected one of {', '.join(WHITENINGS)}")
    if cfg.whitening != "none" and whitening is None and learn:
        # learned with these settings on these features (a rerun), or on the first rows of a
        # collection that has grown since (ids are appended): reused, not relearned, unless asked
        settings = {"kind": cfg.whitening, "dim": cfg.whitening_dim, "shrinkage": cfg.whitening_shrinkage}
        wparams = {**settings, "rows": int(len(ids)), "features_sha256_16": _features_hash(ids, F, len(ids))}
        old = _literal(whitening_params(wpath))
        n0 = old.get("rows", -1) if isinstance(old, dict) else -1
        same = (isinstance(old, dict) and {k: old.get(k) for k in settings} == settings and 0 < n0 <= len(ids)
                and old.get("features_sha256_16") == _features_hash(ids, F, n0))
        if same and (n0 == len(ids) or not cfg.relearn_whitening):
            whitening = load_whitening(wpath)
            log.info("extract: %s whitening reused: %s", cfg.whitening, "same features and settings" if n0 == len(ids) else
                     f"learned on the first {n0} of {len(ids)} descriptors (the collection grew; set "
                     "[extract].relearn_whitening = true to learn it on all)")
        else:
            whitening = learn_whitening(F, cfg)
            save_whitening(whitening, wpath, params=wparams)
            log.info("extract: %s whitening learned on %d descriptors: %d -> %d dims", cfg.whitening, len(ids), F.shape[1], whitening.dim)
            if cfg.whitening_dim and whitening.dim < cfg.whitening_dim:
                log.warning("extract: whitening_dim = %d, but %d descriptors support only %d dimensions: whitened to %d "
                            "(set [extract].whitening_dim = %d to say so, or 0 for every dimension the data supports)",
                            cfg.whitening_dim, len(ids), whitening.dim, whitening.dim, whitening.dim)
    X = whitening.apply(F) if (whitening is not None and cfg.whitening != "none") else l2_normalize(F)
    whash = hashlib.sha256(X.tobytes()).hexdigest()[:16]
    ddir = out_dir / "descriptors"
    for stale in list_shards(ddir):
        stale.unlink()
    # one descriptor shard per feature shard, same id ranges
    for p in list_shards(out_dir / features):
        sid = read_table(p, ["id"]).column("id").to_numpy()
        if sid.size == 0:
            continue
        sel = np.searchsorted(ids, sid)
        write_descriptors(ddir / p.name, ids[sel], [keys[i] for i in sel], X[sel], params=whash)
    manifest = {
        "format_version": 1,
        "n": int(len(ids)),
        "dim": int(X.shape[1]),
        "feature_dim": int(F.shape[1]),
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "pooling": cfg.pooling,
        "gem_p": cfg.gem_p,
        "max_side": cfg.max_side,
        "scales": list(cfg.scales),
        "scale_p": cfg.scale_p,
        "whitening": cfg.whitening if whitening is not None else "none",
        "whitening_dim": whitening.dim if whitening is not None else None,
        "region_whitening": cfg.region_whitening,
        "descriptors_sha256_16": whash,
    }
    try:
        from .models import resolve_weights, file_sha256

        manifest["weights_sha256"] = file_sha256(resolve_weights(cfg.weights, cfg.backbone))
    except Exception:  # the weights were needed to get here; a hash failure is not fatal
        pass
    write_json(manifest, out_dir / "manifest.json")
    return manifest


def run_extract(out_dir: Path, cfg: ExtractConfig, *, with_boxes: bool = False, whitening: Whitening | None = None, learn: bool = True,
                run_dir: Path | None = None, gcfg: GraphConfig | None = None) -> dict:
    """Full extract stage on `out_dir/images` (database: learn whitening; queries: apply the
    database's, found in `run_dir`). pooling = "os_egm" (object discovery) needs `gcfg`, the graph
    settings of its region graph, and runs its two passes (pipelines/discover.py)."""
    if cfg.pooling == "os_egm":
        from .discover import first_pass, os_pass

        summary = extract_features(out_dir / "images", out_dir, first_pass(cfg), with_boxes=with_boxes)
        t0 = time.perf_counter()
        make, extra = os_pass(run_dir or out_dir, out_dir, cfg, gcfg or GraphConfig(), features=feature_params(first_pass(cfg)))
        summary["regions_s"] = time.perf_counter() - t0  # the region index grown or built, its centrality solved
        summary["os"] = extract_features(out_dir / "images", out_dir, cfg, with_boxes=with_boxes, make=make, folder="os_features",
                                         extra_params=extra)
        summary["manifest"] = finalize_descriptors(out_dir, cfg, whitening=whitening, learn=learn, run_dir=run_dir, features="os_features")
        return summary
    summary = extract_features(out_dir / "images", out_dir, cfg, with_boxes=with_boxes)
    summary["manifest"] = finalize_descriptors(out_dir, cfg, whitening=whitening, learn=learn, run_dir=run_dir)
    return summary
