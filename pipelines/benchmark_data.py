"""The synthetic instance-retrieval benchmark on disk (images + Revisited-format gnd.json): the
demo's data set, built from scikit-image photos (the scripts under pipelines/benchmarks/ measure).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from retrieval import synthetic

from .config import BenchmarkConfig, params_hash
from .shards import read_json, write_bytes, write_json

log = logging.getLogger(__name__)
DISTRACTOR_SOURCES = ("brick", "grass", "gravel", "cell", "text", "colorwheel", "logo", "checkerboard", "microaneurysms")


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo by name as (H, W, 3) float in [0, 1]."""
    import skimage.data as data

    if name == "motorcycle":
        return synthetic.to_rgb_float(data.stereo_motorcycle()[0])
    fn = getattr(data, name, None)
    if fn is None:
        raise ValueError(f"benchmark: unknown scikit-image photo {name!r}")
    return synthetic.to_rgb_float(fn())


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_benchmark(cfg: BenchmarkConfig, out: str | Path) -> Path:
    """Write `out/db/*.jpg`, `out/queries/*.jpg` and `out/gnd.json`; skipped if already complete.

    imlist/qimlist hold keys relative to `db/` and `queries/`, as `retrieval ingest` names them.

    gnd.json follows the Revisited Oxford layout: imlist, qimlist, gnd[i] = {easy, hard, junk, bbx}
    (indices into imlist), plus landmark metadata and the train/test split.
    """
    out = Path(out)
    gnd_path = out / "gnd.json"
    phash = benchmark_hash(cfg)
    if gnd_path.is_file() and read_json(gnd_path).get("params") == phash:
        log.info("benchmark: %s is complete, skipping", out)
        return gnd_path
    overlap = set(cfg.train_landmarks) & set(cfg.test_landmarks)
    if overlap:
        raise ValueError(f"benchmark: landmarks {sorted(overlap)} are in both train and test")
    lo, hi = (list(cfg.object_coverage) + [0.0, 0.0])[:2]
    if cfg.mode == "clutter" and not (len(cfg.object_coverage) == 2 and 0 < lo <= hi <= 0.9):
        raise ValueError(f"benchmark: object_coverage must be [min, max] with 0 < min <= max <= 0.9, got {cfg.object_coverage}")
    rng = np.random.default_rng(cfg.seed)
    clutter = [load_photo(n) for n in DISTRACTOR_SOURCES]
    maker = _ViewMaker(cfg, clutter, rng)
    landmarks = list(cfg.test_landmarks) + list(cfg.train_landmarks)
    imlist: list[str] = []
    labels: list[tuple[str, str]] = []  # (landmark, label) per db image
    db_boxes: list[list[float] | None] = []  # the landmark's box (x0, y0, x1, y1) in each db image
    total = len(landmarks) * (cfg.views_per_landmark + cfg.queries_per_landmark) + cfg.distractors
    bar = tqdm(total=total, desc="benchmark", unit="img")
    queries: list[dict] = []
    for li, name in enumerate(landmarks):
        photo = load_photo(name)
        # difficulties spread evenly so every landmark has a chain from easy to hard views
        diffs = (np.arange(cfg.views_per_landmark) + rng.uniform(size=cfg.views_per_landmark)) / cfg.views_per_landmark
        for vi, d in enumerate(diffs):
            img, label, box = maker.view(photo, d)
            key = f"{name}_{vi:03d}.jpg"
            write_bytes(_jpeg(img, int(rng.integers(70, 95))), out / "db" / key)
            imlist.append(key)
            labels.append((name, label))
            db_boxes.append(list(box))
            bar.update()
        if name in cfg.test_landmarks:
            for qi in range(cfg.queries_per_landmark):
                img, info = maker.query(photo)
                key = f"{name}_q{qi:02d}.jpg"
                write_bytes(_jpeg(img, 90), out / "queries" / key)
                queries.append({"key": key, "landmark": name, "bbx": list(info.bbox)})
                bar.update()
        else:
            bar.update(cfg.queries_per_landmark)
    for di in range(cfg.distractors):
        img = maker.distractor()
        key = f"distractor_{di:05d}.jpg"
        write_bytes(_jpeg(img, int(rng.integers(70, 95))), out / "db" / key)
        imlist.append(key)
        labels.append(("", "distractor"))
        db_boxes.append(None)
        bar.update()
    bar.close()
    order = np.argsort(imlist)  # gnd indices follow the sorted key order used by ingest
    imlist = [imlist[i] for i in order]
    labels = [labels[i] for i in order]
    db_boxes = [db_boxes[i] for i in order]
    gnd = []
    for q in queries:
        sel = {lab: [i for i, (lm, l) in enumerate(labels) if lm == q["landmark"] and l == lab] for lab in ("easy", "hard", "junk")}
        gnd.append({"easy": sel["easy"], "hard": sel["hard"], "junk": sel["junk"], "bbx": q["bbx"]})
    counts = {lab: sum(1 for _, l in labels if l == lab) for lab in ("easy", "hard", "junk", "distractor")}
    write_json(
        {
            "imlist": imlist,
            "qimlist": [q["key"] for q in queries],
            "gnd": gnd,
            "landmarks": {"train": list(cfg.train_landmarks), "test": list(cfg.test_landmarks)},
            "query_landmarks": [q["landmark"] for q in queries],
            "db_landmarks": [lm for lm, _ in labels],
            "db_boxes": db_boxes,
            "label_counts": counts,
            "mode": cfg.mode,
            "params": phash,
        },
        gnd_path,
    )
    log.info("benchmark: %d database images (%s), %d queries -> %s", len(imlist), counts, len(queries), out)
    return gnd_path


def benchmark_hash(cfg: BenchmarkConfig) -> str:
    """Parameters hash of a benchmark; the clutter-mode keys count only in clutter mode (so benchmarks
    written before they existed stay complete)."""
    import dataclasses

    d = dataclasses.asdict(cfg)
    if cfg.mode == "views":
        for k in ("mode", "scenes", "object_coverage"):
            d.pop(k)
    return params_hash(d)


class _ViewMaker:
    """Database views, query views and distractors of one benchmark, in its mode."""

    def __init__(self, cfg: BenchmarkConfig, clutter: list[np.ndarray], rng: np.random.Generator):
        self.cfg, self.clutter, self.rng = cfg, clutter, rng
        self.scenes = [synthetic.make_scene(clutter, rng, size=cfg.image_size) for _ in range(cfg.scenes)] if cfg.mode == "clutter" else []

    def _coverage(self) -> float:
        lo, hi = self.cfg.object_coverage
        return float(np.exp(self.rng.uniform(np.log(lo), np.log(hi))))

    def _scene(self) -> np.ndarray:
        return self.scenes[self.rng.integers(len(self.scenes))]

    def view(self, photo: np.ndarray, difficulty: float) -> tuple[np.ndarray, str, tuple[float, float, float, float]]:
        """(image uint8, label, the landmark's box (x0, y0, x1, y1)) of one database view."""
        if self.cfg.mode == "clutter":
            img, info = synthetic.place_object(self._scene(), photo, coverage=self._coverage(), difficulty=difficulty, rng=self.rng)
            return img, synthetic.label_clutter_view(info), info.bbox
        img, info = synthetic.make_view(photo, self.clutter, difficulty=difficulty, rng=self.rng, size=self.cfg.image_size)
        return img, synthetic.label_view(info), info.bbox

    def query(self, photo: np.ndarray) -> tuple[np.ndarray, synthetic.ViewInfo]:
        """A query view (easy, difficulty <= 0.3) and its info (bbox: the object's box, the query crop)."""
        d = self.rng.uniform(0.0, 0.3)
        if self.cfg.mode == "clutter":
            return synthetic.place_object(self._scene(), photo, coverage=self._coverage(), difficulty=d, rng=self.rng)
        return synthetic.make_view(photo, self.clutter, difficulty=d, rng=self.rng, size=self.cfg.image_size)

    def distractor(self) -> np.ndarray:
        """An image of no landmark. Clutter mode: a shared scene with, half the time, an object-sized
        patch of another texture in it (so "has an object" does not give the positives away)."""
        if self.cfg.mode == "clutter":
            patch = None
            if self.rng.uniform() < 0.5:
                patch = synthetic.background(self.clutter, (96, int(96 * self.rng.choice([0.75, 1.0, 1.33]))), self.rng)
            return synthetic.place_object(self._scene(), patch, coverage=self._coverage(), difficulty=self.rng.uniform(0, 0.5), rng=self.rng)[0]
        return synthetic.make_distractor(self.clutter, self.rng, size=self.cfg.image_size)
