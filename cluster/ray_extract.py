"""Descriptor extraction on Ray Data: Parquet image shards -> actor pool running the CNN.

The driver receives (shard, ids, vectors) as each input shard completes, so the pipeline can write
every descriptor shard atomically as soon as it is whole.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


# Fault-injection hook for the cluster tests: seconds each actor sleeps per batch, so that a node can
# be killed while extraction is surely in flight (set through the job's runtime_env).
DELAY_ENV = "RETRIEVAL_TEST_EMBED_DELAY_S"
# Ray Data block size for extraction (encoded images read, decoded pixels passed to the actors)
TARGET_BLOCK_BYTES = 4 << 20


class _EmbedActor:
    """Ray Data callable class: builds the extractor once per actor, embeds batches."""

    def __init__(self, make_extractor: Callable[[], Any]):
        self.extract = make_extractor()
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.delay:
            time.sleep(self.delay)
        ok = np.asarray(batch["ok"], bool)
        sel = np.flatnonzero(ok)
        res = self.extract.embed([batch["pixels"][i] for i in sel], [batch["geom"][i] for i in sel],
                                 ids=[int(batch["id"][i]) for i in sel])
        vec = np.zeros((len(ok), self.extract.dim), np.float32)
        vec[sel] = res["vector"]
        out = {"path": batch["path"], "id": batch["id"], "vector": vec, "ok": ok, "reason": batch["reason"]}
        if "regions" in res:  # ragged per image: carried as flat vectors
            regs = [np.zeros(0, np.float32)] * len(ok)
            bxs = [np.zeros(0, np.float32)] * len(ok)
            for j, i in enumerate(sel):
                regs[i], bxs[i] = res["regions"][j].ravel(), res["region_boxes"][j].ravel()
            out["regions_flat"] = np.array(regs + [None], dtype=object)[:-1]
            out["region_boxes_flat"] = np.array(bxs + [None], dtype=object)[:-1]
        return out


class _Decode:
    """Ray Data task: encoded bytes -> resized uint8 pixels (decoding runs on CPU tasks, apart from
    the model actors)."""

    def __init__(self, prepare: Callable):
        self.prepare = prepare

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        boxes = [None if b is None else list(b) for b in batch["bbox"]] if "bbox" in batch else [None] * len(batch["id"])
        pixels = np.empty(len(boxes), dtype=object)
        geoms = np.zeros((len(boxes), 4), np.float32)
        ok = np.ones(len(boxes), bool)
        reasons = np.array([""] * len(boxes), dtype=object)
        for i, (d, b) in enumerate(zip(batch["image"], boxes)):
            try:
                pixels[i], geoms[i] = self.prepare(d, b)
            except (ValueError, OSError) as e:  # a bad image is a reject, not a failed job
                pixels[i], ok[i], reasons[i] = np.zeros((8, 8, 3), np.uint8), False, f"cannot decode at extract: {e}"
        return {"path": batch["path"], "id": batch["id"], "pixels": pixels, "geom": geoms, "ok": ok, "reason": reasons}


def map_batches_actor_pool(ds, cls, *, constructor_args: tuple, actors: int, num_cpus: float, num_gpus: float, batch_size: int):
    """The one wrapper around Ray Data's version-sensitive `map_batches` arguments for actor pools."""
    import ray

    return ds.map_batches(
        cls,
        fn_constructor_args=constructor_args,
        compute=ray.data.ActorPoolStrategy(size=actors),  # `concurrency=` is deprecated since Ray 2.51
        num_cpus=num_cpus,
        num_gpus=num_gpus or None,
        batch_size=batch_size,
        batch_format="numpy",
    )


def shard_rows(shards: list[Path]) -> tuple[dict[str, int], dict[str, Path], list[Path]]:
    """Rows of each shard that has any (from its Parquet footer) and its path, both by file name;
    and the shards with no rows."""
    rows = {Path(p).name: pq.read_metadata(p).num_rows for p in shards}
    return {n: r for n, r in rows.items() if r}, {Path(p).name: Path(p) for p in shards}, [Path(p) for p in shards if not rows[Path(p).name]]


def no_rows(path: Path) -> tuple[Path, np.ndarray, np.ndarray, dict]:
    """What an engine yields for a shard with no rows."""
    return path, np.zeros(0, np.int64), np.zeros((0, 0), np.float32), {}


class ShardAssembler:
    """Rows of many shards arriving in any order and any grouping -> each shard whole, once its
    expected row count is in: (shard path, ids sorted, vectors, extra) as the engines yield them,
    extra["rejects"] the (id, reason) of its images that could not be decoded and, with regions, the
    good images' "regions" / "region_boxes" lists."""

    def __init__(self, expected: dict[str, int], paths: dict[str, Path], progress: Callable[[int], None] | None = None):
        self.expected, self.paths, self.progress = expected, paths, progress
        self.got: dict[str, int] = defaultdict(int)
        self.parts: dict[str, list[tuple]] = defaultdict(list)

    def add(self, name: str, ids: np.ndarray, vec: np.ndarray, ok: np.ndarray, reasons: list[str],
            regions: list[np.ndarray] | None = None, boxes: list[np.ndarray] | None = None
            ) -> Iterator[tuple[Path, np.ndarray, np.ndarray, dict]]:
        """Take n rows of shard `name` (ids (n,), vectors (n, d) float32, ok (n,) bool, n reasons,
        optional per-row regions (r, d) and boxes (r, 4)); yields the shard if it is now whole."""
        self.parts[name].append((ids, vec, ok, reasons, regions, boxes))
        self.got[name] += len(ids)
        if self.progress:
            self.progress(len(ids))
        if self.got[name] > self.expected[name]:
            raise RuntimeError(f"ray extract: shard {name} produced {self.got[name]} rows, expected {self.expected[name]}")
        if self.got[name] < self.expected[name]:
            return
        parts = self.parts.pop(name)
        ids = np.concatenate([p[0] for p in parts]).astype(np.int64)
        vec = np.concatenate([p[1] for p in parts]).astype(np.float32)
        ok = np.concatenate([p[2] for p in parts])
        why = [r for p in parts for r in p[3]]
        order = np.argsort(ids, kind="stable")
        good = order[ok[order]]
        extra: dict[str, Any] = {"rejects": [(int(ids[i]), why[i]) for i in order if not ok[i]]}
        if parts[0][4] is not None:
            regs, bxs = [r for p in parts for r in p[4]], [b for p in parts for b in p[5]]
            extra.update(regions=[regs[i] for i in good], region_boxes=[bxs[i] for i in good])
        yield self.paths[name], ids[good], vec[good], extra

    def add_batch(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[Path, np.ndarray, np.ndarray, dict]]:
        """Take one batch as the model actors return it (`_EmbedActor`'s columns, rows of any shards)."""
        names = np.array([Path(str(p)).name for p in batch["path"]])
        regs = boxes = None
        if "regions_flat" in batch:
            d = batch["vector"].shape[1]
            regs = [np.asarray(r, np.float32).reshape(-1, d) for r in batch["regions_flat"]]
            boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in batch["region_boxes_flat"]]
        for name in np.unique(names):
            sel = np.flatnonzero(names == name)
            yield from self.add(name, batch["id"][sel], batch["vector"][sel], np.asarray(batch["ok"], bool)[sel],
                                [batch["reason"][i] for i in sel], None if regs is None else [regs[i] for i in sel],
                                None if boxes is None else [boxes[i] for i in sel])

    def check_complete(self) -> None:
        missing = {n: self.expected[n] - self.got.get(n, 0) for n in self.expected if self.got.get(n, 0) != self.expected[n]}
        if missing:
            raise RuntimeError(f"ray extract: incomplete shards (rows missing): {missing}")


READ_TASK_CPUS = 1.0  # Ray Data's Parquet read tasks ask one CPU: 2 actors x 0.75 of 2 CPUs left 0.5 and the job hung


def extraction_fits(*, actors: int, actor_cpus: float, decode_cpus: float, cluster_cpus: float, cluster_gpus: float = 0.0) -> str | None:
    """Why an extraction of `actors` model actors cannot run well on a cluster of `cluster_cpus`
    CPUs and `cluster_gpus` GPUs, or None when it can. The actors hold their CPUs for the whole
    job; reading (one CPU a task, `READ_TASK_CPUS`) and decoding (`decode_cpus` a task) run as Ray
    Data tasks on what is left, so one task of each kind must fit in it (else the actors starve the
    reads and the job hangs).
    With GPUs each actor takes one, so there must be a GPU per actor."""
    if cluster_gpus >= 1 and actors > cluster_gpus:
        return f"{actors} extraction actors need one GPU each and the cluster has {cluster_gpus:g}: set [extract].actors <= {int(cluster_gpus)}"
    free = cluster_cpus - actors * actor_cpus
    need = max(decode_cpus, READ_TASK_CPUS)
    if free < need:
        return (f"{actors} extraction actors x {actor_cpus:g} CPUs leave {max(free, 0):g} of the cluster's {cluster_cpus:g} CPUs for "
                f"read tasks of {READ_TASK_CPUS:g} CPU and decode tasks of {decode_cpus:g}: lower [extract].actors or actor_num_cpus "
                "(the actors would starve the reads and the job would hang)")
    return None


def extract_shards_ray(
    shards: list[Path],
    make_extractor: Callable[[], Any],
    *,
    prepare: Callable[[bytes, Any], tuple[np.ndarray, np.ndarray]],
    decode_num_cpus: float = 0.5,
    actors: int = 1,
    num_cpus: float = 1.0,
    batch_size: int = 16,
    with_boxes: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
    """Yield (shard path, ids (n,) int64, vectors (n, d) float32 sorted by id, extra) per finished
    shard; extra["rejects"] lists (id, reason) of images that could not be decoded.

    `prepare(bytes, bbox) -> (pixels, geom)` runs in Ray Data tasks (`decode_num_cpus` each); the
    model runs in `actors` actors (`num_cpus` each, one GPU each when the cluster has GPUs).
    """
    import ray

    from .ray_runtime import require_ray

    if not shards:
        return
    require_ray("extraction (extract engine = ray)")
    expected, by_name, empty = shard_rows(shards)
    yield from map(no_rows, empty)
    if not expected:
        return
    resources = ray.cluster_resources()
    num_gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    why = extraction_fits(actors=actors, actor_cpus=num_cpus, decode_cpus=decode_num_cpus, cluster_cpus=resources.get("CPU", 0.0),
                          cluster_gpus=resources.get("GPU", 0.0))
    if why:
        from .errors import ClusterError

        raise ClusterError(f"ray extract: {why}")
    columns = ["id", "image"] + (["bbox"] if with_boxes else [])
    # Ray Data's Parquet reader packs small files into blocks of up to target_max_block_size (128 MiB
    # by default): a thousand encoded images made one block, so decoding and the model ran one after
    # the other instead of side by side (0.78 of the raw forward throughput). Blocks of a few MiB
    # stream: the actors start on the first decoded images while the rest decode.
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.target_max_block_size = TARGET_BLOCK_BYTES
    # the stage draws its own progress bar: Ray Data's bars and plan printouts would repeat it
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    # Ray 2.60's Parquet reader (DataSourceV2) starts a pool of footer-reading actors, one worker
    # process each, before the first block: 16 processes started one after another took ~20 s of a
    # 2-core machine before the first descriptors (157 shards); the V1 reader lists the files in the
    # driver (BENCHMARKS.md: extraction's start-up). A no-op on a Ray without the flag.
    data_ctx.use_datasource_v2 = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we know
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.datasource.parquet_datasource").setLevel(logging.WARNING)  # its size estimates
    ds = ray.data.read_parquet([str(by_name[n]) for n in expected], include_paths=True).select_columns(columns + ["path"])
    ds = ds.map_batches(_Decode(prepare), num_cpus=decode_num_cpus, batch_size=batch_size, batch_format="numpy")
    ds = map_batches_actor_pool(
        ds, _EmbedActor, constructor_args=(make_extractor,), actors=actors, num_cpus=num_cpus, num_gpus=num_gpus, batch_size=batch_size
    )
    shards_out = ShardAssembler(expected, by_name, progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield from shards_out.add_batch(batch)
    shards_out.check_complete()
