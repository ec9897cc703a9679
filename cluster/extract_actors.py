"""Descriptor extraction on warm model actors: named Ray actors that can outlive the stage.

Ray Data builds a new actor pool for every dataset: each extraction pays for new worker processes,
torch's import and the model's construction (6.5-8 s here before the first descriptors, most of
a 1,000-image level: BENCHMARKS.md). This engine (`[extract] engine = "ray_actors"`) runs the same
decode + model step (`ray_extract._Decode` then `_EmbedActor`, fused as Ray Data fuses them) in
named actors of the namespace `NAMESPACE`: the driver deals row ranges of the image shards,
`batch_size` rows each, to the actors (two in flight per actor, so none waits for the next), each
actor reads its rows from the shard file itself, and the driver assembles each shard whole. No
image crosses the driver or the object store (every node must see the run's folder, as Ray Data's
read tasks must): shipping each chunk's bytes through them cost the pipeline ~1% of its rate here
on two cores (BENCHMARKS.md), and on a cluster it would pass every image through the driver's
node. With `keep = True` the actors are detached: they stay in the cluster, idle, and the next
extraction with the same extractor (a canonical form of its constructor: `pool_key`) reuses them;
an extraction with another extractor replaces them. On the embedded Ray they end with the
stage's process either way; `retrieval experiment` runs every level's stages on one Ray of its
own, so its levels share one warm pool (and it ends with the experiment).

An actor that dies is restarted by Ray and its chunks retried (`max_restarts`, `max_task_retries`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .ray_extract import ShardAssembler, _Decode, _EmbedActor, no_rows, shard_rows

log = logging.getLogger(__name__)

NAMESPACE = "retrieval-extract"
IN_FLIGHT = 2  # chunks queued per actor: the next one is there when an actor finishes
RESTARTS = 3  # restarts of a dead actor (its chunks retried), per actor


class _ModelActor:
    """Decode + model, as Ray Data's fused pool runs them (`_Decode` then `_EmbedActor`)."""

    def __init__(self, make_extractor: Callable[[], Any], prepare: Callable, key: str):
        self.decode, self.embed, self.key = _Decode(prepare), _EmbedActor(make_extractor), key
        self._shard: tuple[str, Any] = ("", None)  # the last shard read (path, table): chunks come in shard order

    def params(self) -> str:
        return self.key

    def pid(self) -> int:
        import os

        return os.getpid()

    def device(self) -> str:
        """Where the model runs ("cpu", "cuda:0", ...)."""
        return str(getattr(self.embed.extract, "device", "cpu"))

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.embed(self.decode(batch))

    def run_rows(self, path: str, start: int, stop: int, with_boxes: bool) -> dict[str, np.ndarray]:
        """`run` on rows [start, stop) of the image shard at `path`, read here (the last shard read is
        kept: an actor's chunks come in shard order, so it reads each shard once)."""
        import pyarrow.parquet as pq

        if self._shard[0] != path:
            self._shard = (path, pq.read_table(path, columns=["id", "image"] + (["bbox"] if with_boxes else [])))
        return self.run(rows_batch(path, self._shard[1].slice(start, stop - start), with_boxes))

    def warm(self) -> dict[str, np.ndarray]:
        """Run the whole path once, so that the first chunks of the first extraction do not pay for
        first calls (the first Parquet file read in a process took 0.19 s here, the later ones 3 ms;
        the first result sent back 0.08 s): a shard of two JPEGs, landscape and portrait, written,
        read by `run_rows` and embedded. Returns that result, as `run_rows` does."""
        import io
        import os
        import tempfile

        import pyarrow as pa
        import pyarrow.parquet as pq
        from PIL import Image

        images = []
        for size in ((640, 480), (480, 640)):
            buf = io.BytesIO()
            Image.new("RGB", size, (90, 120, 150)).save(buf, format="JPEG")
            images.append(buf.getvalue())
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "warm-up.parquet")
            pq.write_table(pa.table({"id": pa.array([0, 1], pa.int64()), "image": pa.array(images, pa.binary())}), path)
            out = self.run_rows(path, 0, 2, False)
        self._shard = ("", None)
        return out

    def forward_clock(self) -> tuple[float, int] | None:
        """The extractor's `forward_clock()` (CPU seconds in its forward passes, images), None if it has none."""
        clock = getattr(self.embed.extract, "forward_clock", None)
        return clock() if clock else None


def _canonical(x: Any) -> Any:
    """A JSON-able form of an extractor constructor and its arguments that is equal for equal values
    (pickled bytes are not: pickle shares repeated strings by identity, so two equal configurations
    loaded in different processes pickled differently); anything else by its pickled bytes."""
    if isinstance(x, functools.partial):
        return ["partial", _canonical(x.func), [_canonical(a) for a in x.args], {k: _canonical(v) for k, v in x.keywords.items()}]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [_canonical(type(x)), {f.name: _canonical(getattr(x, f.name)) for f in dataclasses.fields(x)}]
    if isinstance(x, (type, types.FunctionType)):
        return f"{x.__module__}.{x.__qualname__}"
    if isinstance(x, (list, tuple)):
        return [_canonical(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _canonical(v) for k, v in x.items()}
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    import ray.cloudpickle

    return "pickle:" + hashlib.sha256(ray.cloudpickle.dumps(x)).hexdigest()


def pool_key(*parts: Any) -> str:
    """Key of the extractor constructor, decode function and placement: actors built from equal ones
    are interchangeable."""
    return hashlib.sha256(json.dumps(_canonical(parts), sort_keys=True).encode()).hexdigest()[:16]


def pool_names() -> list[str]:
    """Names of the model actors alive in this cluster (any extractor)."""
    import ray.util

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE)


def stop_pool(names: list[str] | None = None) -> None:
    """Kill the named model actors (every one when `names` is None)."""
    import ray

    if not ray.is_initialized():  # no Ray in this process: no actors of ours to stop (and Ray is not started for it)
        return
    for name in pool_names() if names is None else names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # gone already
            pass


def model_actors(make_extractor: Callable, prepare: Callable, *, actors: int, num_cpus: float, keep: bool) -> list:
    """`actors` model actors for this extractor (`num_cpus` each, one GPU each when the cluster has
    GPUs): the ones alive in the cluster when their key matches, else new ones (detached when
    `keep`); the pool of any other extractor is killed first, so it does not hold the CPUs the new
    one needs. A pool that does not fit the cluster is refused (ClusterError)."""
    import ray

    from .errors import ClusterError

    res = ray.cluster_resources()
    num_gpus = 1.0 if res.get("GPU", 0) >= 1 else 0.0
    if num_gpus and actors > res["GPU"]:
        raise ClusterError(f"ray_actors extract: {actors} model actors need one GPU each and the cluster has {res['GPU']:g}: "
                           f"set [extract].actors <= {int(res['GPU'])}")
    if actors * num_cpus > res.get("CPU", 0.0):
        raise ClusterError(f"ray_actors extract: {actors} model actors x {num_cpus:g} CPUs do not fit the cluster's "
                           f"{res.get('CPU', 0.0):g} CPUs: lower [extract].actors or actor_num_cpus")
    key = pool_key(make_extractor, prepare, num_cpus, num_gpus)
    names = [f"model-{key}-{i}" for i in range(actors)]
    stale = [n for n in pool_names() if n not in names]
    if stale:
        log.info("extract: replacing %d model actors of another extractor", len(stale))
        stop_pool(stale)
    cls = ray.remote(_ModelActor)
    reused = set(pool_names())
    handles = [cls.options(name=n, namespace=NAMESPACE, get_if_exists=True, lifetime="detached" if keep else None, num_cpus=num_cpus,
                           num_gpus=num_gpus or None, max_restarts=RESTARTS, max_task_retries=RESTARTS).remote(make_extractor, prepare, key)
               for n in names]
    log.info("extract: %d model actors (%d warm, %s)", actors, len(reused & set(names)), "kept after the stage" if keep else "stopped after it")
    return handles


def warm_pool(make_extractor: Callable, prepare: Callable, *, actors: int, num_cpus: float) -> list[int]:
    """Start (or find) the kept model actors `extract_shards_actors(..., keep=True)` will use for this
    extractor and wait until each has built its model and run it once (`_ModelActor.warm`: the first
    extraction after the warm-up read 0.849-0.853 of the model's rate, the later ones 0.871-0.884
    here); returns their process ids."""
    import ray

    handles = model_actors(make_extractor, prepare, actors=actors, num_cpus=num_cpus, keep=True)
    ray.get([h.warm.remote() for h in handles])
    return ray.get([h.pid.remote() for h in handles])


def rows_batch(path: str, t, with_boxes: bool) -> dict[str, np.ndarray]:
    """Rows of an image shard (a pyarrow table of id, image and, `with_boxes`, bbox) as Ray Data hands
    them to `_Decode`: path, id, image (bytes), bbox."""
    batch = {"path": np.array([path] * t.num_rows, dtype=object), "id": t.column("id").to_numpy().astype(np.int64),
             "image": _objects(t.column("image").to_pylist())}
    if with_boxes:
        batch["bbox"] = _objects(t.column("bbox").to_pylist())
    return batch


def _objects(values: list) -> np.ndarray:
    """A 1-d object array of `values`, even when they are sequences of one length (boxes)."""
    return np.array(values + [None], dtype=object)[:-1]


def _row_ranges(shards: list[Path], rows: list[int], batch_size: int, tail_rows: int = 0) -> Iterator[tuple[str, int, int]]:
    """(shard path, start, stop): `batch_size` rows at a time, in shard order (`rows`: each shard's
    row count). The last `tail_rows` rows go in ranges a quarter that size, so the actors finish
    together (a whole chunk queued on one actor while another has nothing left idled that one for a
    chunk's time)."""
    left = sum(rows)
    for p, n in zip(shards, rows):
        i = 0
        while i < n:
            j = min(i + (batch_size if left > tail_rows else max(1, batch_size // 4)), n)
            left -= j - i
            yield str(p), i, j
            i = j


def _result(ref, path: str) -> dict[str, np.ndarray]:
    """A chunk's result; a shard its actor could not read is one clear error (ClusterError)."""
    import ray

    from .errors import ClusterError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, OSError):
            raise ClusterError(f"ray_actors extract: a model actor cannot read {path}: {e.cause}; the actors read the image shards "
                               "themselves, so every node must see the run's folder (shared storage)") from None
        raise


def extract_shards_actors(
    shards: list[Path],
    make_extractor: Callable[[], Any],
    *,
    prepare: Callable[[bytes, Any], tuple[np.ndarray, np.ndarray]],
    actors: int = 1,
    num_cpus: float = 1.0,
    batch_size: int = 16,
    with_boxes: bool = False,
    keep: bool = False,
    progress: Callable[[int], None] | None = None,
    clocks: list | None = None,
) -> Iterator[tuple[Path, np.ndarray, np.ndarray, dict]]:
    """Yield (shard path, ids (n,) int64, vectors (n, d) float32 sorted by id, extra) per finished
    shard, as `ray_extract.extract_shards_ray` does, from `actors` warm model actors (`num_cpus`
    each, one GPU each when the cluster has GPUs). The actors decode too: nothing else runs on Ray,
    so they may take every CPU of the cluster. When every shard is done, `clocks` (if given) gets
    each actor's (before, after) `forward_clock()` readings of this extraction."""
    import ray

    from .ray_runtime import require_ray

    if not shards:
        return
    require_ray("extraction (extract engine = ray_actors)")
    expected, by_name, empty = shard_rows(shards)
    yield from map(no_rows, empty)
    if not expected:
        return
    handles = model_actors(make_extractor, prepare, actors=actors, num_cpus=num_cpus, keep=keep)
    out = ShardAssembler(expected, by_name, progress)
    todo = _row_ranges([by_name[n] for n in expected], list(expected.values()), batch_size, tail_rows=len(handles) * IN_FLIGHT * batch_size)
    owner: dict[Any, tuple[Any, str]] = {}  # chunk result ref -> (the actor working on it, its shard)
    before = [h.forward_clock.remote() for h in handles]  # an actor runs its calls in order: read before its first chunk
    try:
        for h in handles:
            for rng in [r for _, r in zip(range(IN_FLIGHT), todo)]:
                owner[h.run_rows.remote(*rng, with_boxes)] = (h, rng[0])
        while owner:
            [ref], _ = ray.wait(list(owner), num_returns=1)
            h, path = owner.pop(ref)
            nxt = next(todo, None)
            if nxt is not None:
                owner[h.run_rows.remote(*nxt, with_boxes)] = (h, nxt[0])
            yield from out.add_batch(_result(ref, path))
        out.check_complete()
        if clocks is not None:
            clocks += zip(ray.get(before), ray.get([h.forward_clock.remote() for h in handles]))
    finally:
        if not keep:
            stop_pool()
