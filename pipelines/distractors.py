"""Distractor images for scaling experiments, and how distracting they are.

There is no Flickr100k here, so `write_synthetic` makes a distractor collection that behaves like
one: every image is generated from its own seed (seed, index), so a batch can be written in any
order, resumed, and extended (image i is the same image whatever the batch), from scikit-image's
photos and textures warped, recoloured, cropped and composed with fractal noise, polygons, strokes,
text, smooth colour fields and gratings, the frame cut into regions of different layers
(`retrieval.distractor_images.DistractorMaker`, generator 4 by default, 2 and 3 on request; the
benchmark's own distractors keep `make_distractor`).
Users with a real collection point the experiment at a folder instead (`user_batch`).

`distractor_stats` measures what matters: each query's most similar distractor against its most
similar positive, and the near-duplicates among the distractors (pairs above a similarity
threshold, as linked groups and as sets around a centre: `retrieval.near_duplicates`).
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .shards import write_bytes

log = logging.getLogger(__name__)


def synthetic_name(i: int) -> str:
    return f"dis{i:08d}.jpg"


GENERATOR = 4  # the default of `retrieval.distractor_images.GENERATORS`, the versions of the images (an experiment's parameter: never mixed)
_CHUNK = 256  # images a worker writes per task
_maker = None  # the worker process's DistractorMaker
_parent = None  # a pool worker's parent: the worker stops drawing when it is gone


def _init_worker(generator: int, parent: int | None = None) -> None:
    global _maker, _parent
    _parent = parent
    from retrieval.distractor_images import DistractorMaker

    from .benchmark_data import DISTRACTOR_SOURCES, load_photo

    _maker = DistractorMaker([load_photo(n) for n in DISTRACTOR_SOURCES], generator)


def _write_chunk(folder: Path, indices: list[int], seed: int, size: int, generator: int) -> int:
    if _maker is None or _maker.generator != generator:
        _init_worker(generator, _parent)
    for i in indices:
        if _parent is not None and os.getppid() != _parent:
            # the caller was killed: a pool worker would finish its chunk and then wait for more work
            # forever, an orphan beside the rerun; it exits now instead
            os._exit(1)
        buf = io.BytesIO()
        Image.fromarray(_maker(np.random.default_rng([seed, generator, i]), size)).save(buf, format="JPEG", quality=85)
        write_bytes(buf.getvalue(), folder / synthetic_name(i))
    return len(indices)


def write_synthetic(folder: Path, start: int, stop: int, *, seed: int, size: int = 288, workers: int = 0,
                    generator: int = GENERATOR) -> Path:
    """Distractors start..stop-1 as JPEGs in `folder` (those already there are kept) by `generator`
    (one of `retrieval.distractor_images.GENERATORS`, `DistractorMaker`), in `workers` processes (0: one per CPU) when there are
    more than a chunk of them. Killed, it leaves no worker drawing on: each stops at its next image."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(start, stop) if not (folder / synthetic_name(i)).is_file()]
    chunks = [todo[j : j + _CHUNK] for j in range(0, len(todo), _CHUNK)]
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    with tqdm(total=len(todo), desc="distractors", unit="img", disable=not todo) as bar:
        if workers <= 1:
            for c in chunks:
                bar.update(_write_chunk(folder, c, seed, size, generator))
            return folder
        # spawned, not forked: the caller may hold threads (torch, Ray) that a fork would copy mid-state
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(generator, os.getpid())) as pool:
            for f in as_completed([pool.submit(_write_chunk, folder, c, seed, size, generator) for c in chunks]):
                bar.update(f.result())
    return folder


def user_batch(source: str | Path, start: int, stop: int, list_path: Path, extensions: list[str]) -> Path:
    """Images start..stop-1 (in sorted path order) of a user's distractor folder, as a list file that
    ingest reads. ValueError when the folder holds fewer than `stop` images."""
    exts = {e.lower() for e in extensions}
    files = sorted(p for p in Path(source).rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if len(files) < stop:
        raise ValueError(f"experiment: distractors.source {source} holds {len(files)} images; the levels need {stop}")
    write_bytes(("\n".join(str(p.resolve()) for p in files[start:stop]) + "\n").encode(), list_path)
    return list_path


def distractor_stats(X: np.ndarray, Q: np.ndarray, positives: list[np.ndarray], distractor_rows: np.ndarray, *,
                     near_dup: float = 0.95) -> dict:
    """How distracting the distractors are, from whitened descriptors.

    Args: X (n, d) database rows, Q (nq, d) queries, positives: per query the rows of its positives,
    distractor_rows: rows of the distractors. Returns per-query medians and quantiles of the nearest
    positive and nearest distractor similarity, the share of queries whose nearest distractor beats
    their nearest positive, and the near-duplicates among distractors (every pair above near_dup):
    `near_duplicate_groups` joins them transitively (a chain of pairs links rows that need not be
    alike: the largest group's pairwise similarities say how much), `near_duplicate_sets` groups
    them around centres (leader clustering: every member a near-duplicate of its set's centre).
    """
    from retrieval.near_duplicates import centred_groups, group_summary, linked_groups, pairwise_spread, similar_pairs

    out: dict = {"distractors": int(len(distractor_rows))}
    if len(distractor_rows) == 0:
        return out
    Dd = Q @ X[distractor_rows].T
    near_d = Dd.max(axis=1)
    near_p = np.array([(Q[i] @ X[p].T).max() if len(p) else np.nan for i, p in enumerate(positives)])
    ok = np.isfinite(near_p)
    out["nearest_positive"] = {q: float(np.quantile(near_p[ok], v)) for q, v in (("p10", 0.1), ("median", 0.5), ("p90", 0.9))}
    out["nearest_distractor"] = {q: float(np.quantile(near_d, v)) for q, v in (("p10", 0.1), ("median", 0.5), ("p90", 0.9))}
    out["queries_distractor_first"] = float((near_d[ok] > near_p[ok]).mean())
    Xd = np.ascontiguousarray(X[distractor_rows])
    pairs = similar_pairs(Xd, near_dup)
    linked = linked_groups(pairs)
    largest = np.flatnonzero(linked == np.bincount(linked).argmax())
    out["near_duplicate_groups"] = {"threshold": near_dup, "pairs": int(pairs.nnz // 2), **group_summary(linked),
                                    "largest_pairwise": pairwise_spread(Xd, largest, near_dup)}
    out["near_duplicate_sets"] = {"threshold": near_dup, **group_summary(centred_groups(pairs))}
    return out
