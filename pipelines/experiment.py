"""Scaling experiments: a base collection with ground truth, then levels of added distractors.

    retrieval experiment deploy/experiments/demo-distractors.toml

One run directory (`OUT/run`) grows level by level: each level adds only its new distractor images
(`ingest_added`: stable ids, new shards), extracts only them, updates the graph (exact index: one
product of the new rows with all; HNSW/IVF: through the index kept with the graph), and ranks and evaluates every method. Each stage of a
level runs in its own process (`isolate = true`) so its wall time and peak RSS are its own; they all
join one Ray the runner starts, with the model actors of the ray_actors engine kept warm across
levels (`_shared_ray`). A level
is recorded (`OUT/levels/<distractors>.json` plus a snapshot of its metrics, evaluation, timings,
config and report in `OUT/levels/<distractors>/`) only when all its stages are done: a killed
experiment reruns from the first unrecorded level, and inside it every stage skips what it
finished. `OUT/results.json`, `OUT/results.parquet` and `OUT/results.html` (plots) gather the levels.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import (
    METHODS, ConfigError, RunConfig, _choice, _min, _path, build_config, config_to_dict, load_config, params_hash, read_toml,
)
from .config_toml import config_to_toml
from .distractors import GENERATOR
from .logs import setup_logging
from .peak_memory import own_peak_gib
from .shards import read_json, read_json_or, write_bytes, write_json

log = logging.getLogger(__name__)
STAGES = ("extract", "graph", "query", "evaluate")


@dataclass
class DistractorConfig:
    source: str = _path()  # "" = synthetic distractors; else a folder of your own (taken in sorted path order)
    seed: int = 1
    image_size: int = _min(288, 16)  # synthetic distractors: the side in pixels each is drawn at (the other 0.75x, 1x or 1.33x it)
    generator: int = GENERATOR  # synthetic distractors: 4, or 2 / 3 (the images of earlier experiments; retrieval.distractor_images.GENERATORS)


@dataclass
class ExperimentConfig:
    base: str = _path()  # the run config of the base collection (with ground truth: [benchmark] or [dataset].gnd)
    out: str = _path()  # experiment folder; "" = runs/experiments/<config file name>
    levels: list[int] = _min([0, 1000], 0)  # distractors on top of the base at each level, increasing
    methods: list[str] = _choice(["knn", "aqe", "diffusion"], METHODS)
    isolate: bool = True  # each stage in its own process: its own time and peak memory (false: in-process, for tests)
    raw_forward_images: int = _min(32, 0)  # per level, the model's forward pass alone timed on up to this many new images (0: not measured)
    distractors: DistractorConfig = field(default_factory=DistractorConfig)


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read an experiment TOML; unknown keys, wrong types and bad levels raise ConfigError naming the key."""
    path = Path(path)
    cfg = build_config(ExperimentConfig, read_toml(path, "experiment"), "")
    if not cfg.base:
        raise ConfigError("experiment: base must name the run config of the base collection")
    if not Path(cfg.base).is_file():
        raise ConfigError(f"experiment: base = {cfg.base!r}: file not found")
    if not cfg.levels or any(b <= a for a, b in zip(cfg.levels, cfg.levels[1:])):
        raise ConfigError(f"experiment: levels must be a non-empty, strictly increasing list of distractor counts; got {cfg.levels}")
    from retrieval.distractor_images import GENERATORS

    if cfg.distractors.generator not in GENERATORS:
        raise ConfigError(f"experiment: distractors.generator must be one of {', '.join(map(str, GENERATORS))}; "
                          f"got {cfg.distractors.generator!r}")
    if cfg.distractors.source and not Path(cfg.distractors.source).is_dir():
        raise ConfigError(f"experiment: distractors.source = {cfg.distractors.source!r} is not a folder")
    cfg.out = cfg.out or f"runs/experiments/{path.stem}"
    return cfg


def run_config(ecfg: ExperimentConfig) -> RunConfig:
    """The base run config, writing to OUT/run and ranking with the experiment's methods (set before
    the base is checked: its own methods are replaced, not validated)."""
    query = read_toml(ecfg.base).get("query", {})
    cfg = load_config(ecfg.base, overrides={"query": {**query, "methods": list(ecfg.methods)}} if isinstance(query, dict) else None)
    cfg.out = str(Path(ecfg.out).resolve() / "run")
    cfg.query.methods = list(ecfg.methods)
    return cfg


def _stage(cfg: RunConfig, stage: str, images: str | None) -> dict:
    """One step of a level: "ingest" (the base), "add" (a distractor batch), "raw" (the forward pass
    alone on up to `images` of the images the last extraction took: {"raw_forward_img_s", "raw_images"})
    or a run stage. Returns what the step measured besides time and memory."""
    from .run import run_stages

    if stage == "add":
        from .ingest import ingest_added

        ingest_added(images, cfg.out, cfg.ingest)
    elif stage == "raw":
        return _raw_forward(cfg, int(images))
    else:
        run_stages(cfg, [stage])
    return {}


def _raw_forward(cfg: RunConfig, limit: int) -> dict:
    """`extractor.raw_forward_rate` on the first `limit` images of the shards the last extraction
    did (run/extract.json), with the extraction's settings and torch threads."""
    from .extractor import raw_forward_rate
    from .shards import read_table

    run = Path(cfg.out)
    images: list[bytes] = []
    for name in read_json(run / "extract.json").get("shards") or []:
        if len(images) >= limit:
            break
        images += read_table(run / "images" / name, ["image"]).column("image").to_pylist()[: limit - len(images)]
    if not images:
        return {}
    return {"raw_forward_img_s": raw_forward_rate(cfg.extract, images), "raw_images": len(images)}


def _measured(ecfg: ExperimentConfig, cfg_path: Path, cfg: RunConfig, stage: str, images: str | None = None) -> dict:
    """Run one step, in a child process when `isolate`: {"seconds", "peak_rss_gib", "isolated"} and
    what the step measured (`_stage`'s result)."""
    t0 = time.perf_counter()
    if not ecfg.isolate:
        got = _stage(cfg, stage, images)
        return {"seconds": time.perf_counter() - t0, "peak_rss_gib": own_peak_gib(), "isolated": False, **got}
    result = cfg_path.parent / f".{stage}.result.json"  # the child's measurements: a file, as libraries may print to stdout
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipelines.experiment", "--child", stage, "--run-config", str(cfg_path), "--result", str(result)]
    res = subprocess.run(cmd + (["--images", images] if images else []))  # its log and progress bars go to our stderr
    if res.returncode == 2:  # the child printed the user error as one line
        raise ValueError(f"experiment: stage {stage} of this level stopped on the error above")
    got = read_json_or(result, None)
    if res.returncode != 0 or not isinstance(got, dict):
        raise RuntimeError(f"experiment: stage {stage} failed (exit {res.returncode}, {'a' if isinstance(got, dict) else 'no'} result); "
                           "its traceback is above")
    result.unlink()
    return {"seconds": time.perf_counter() - t0, "isolated": True, **got}


def _distractor_batch(ecfg: ExperimentConfig, cfg: RunConfig, start: int, stop: int) -> str:
    from .distractors import user_batch, write_synthetic

    out = Path(ecfg.out).resolve() / "distractors"
    d = ecfg.distractors
    if d.source:
        return str(user_batch(d.source, start, stop, out / f"batch-{start:09d}-{stop:09d}.txt", cfg.ingest.extensions))
    return str(write_synthetic(out / "images", start, stop, seed=d.seed, size=d.image_size, generator=d.generator))


def _snapshot(run: Path, dest: Path) -> None:
    for name in ("metrics.json", "evaluation.json", "timings.json", "config.resolved.json", "report.html", "ranks/stats.json"):
        if (run / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / name, dest / name)


def _distraction(cfg: RunConfig, run: Path, n_base: int) -> dict:
    """`distractors.distractor_stats` on the run's descriptors: rows with ids >= n_base are the added distractors."""
    from .descriptors import load_descriptors
    from .distractors import distractor_stats
    from .groundtruth import read_ground_truth

    ids, keys, X = load_descriptors(run / "descriptors", dense=False)
    _, qkeys, Q = load_descriptors(run / "queries" / "descriptors", dense=False)
    gt = read_ground_truth(cfg.dataset.gnd)
    row_of = {k: r for r, k in enumerate(keys)}
    q_of = {Path(k).with_suffix("").as_posix(): i for i, k in enumerate(gt.qimlist)}
    positives = []
    for k in qkeys:
        g = gt.gnd[q_of[Path(k).with_suffix("").as_posix()]] if Path(k).with_suffix("").as_posix() in q_of else {}
        pos = [gt.imlist[i] for part in ("easy", "hard", "ok") for i in g.get(part, [])]
        positives.append(np.array([row_of[p] for p in pos if p in row_of], np.int64))
    return distractor_stats(X, Q, positives, np.flatnonzero(ids >= n_base))


def _extraction(ecfg: ExperimentConfig, cfg_path: Path, cfg: RunConfig, run: Path) -> dict:
    """The level's extraction rate (its new images only: run/extract.json), end to end and from its
    first descriptors on, against two references of the forward pass alone (ratios >= 0.85 are the
    scaling target): `model_ratio`, the model actors' own forward rate during this extraction (their
    CPU time in the forward pass: the machine's drift slows both alike), and `ratio`, a step of its
    own that times the forward pass alone on `raw_forward_images` of the same images afterwards."""
    ex = read_json_or(run / "extract.json", {})
    n, sec = ex.get("images") or 0, ex.get("seconds") or 0.0
    out = {"images": n, "img_s": n / sec if n and sec else None, "steady_img_s": ex.get("steady_img_s")}
    if out["img_s"] and ex.get("model_img_s"):  # against the model actors' own forward rate during this extraction
        out.update(model_img_s=ex["model_img_s"], model_ratio=out["img_s"] / ex["model_img_s"])
    osp = ex.get("os") or {}
    if osp.get("images") and osp.get("seconds"):  # os_egm: the OS.EGM pass (img_s above: the FS.EGM pass) and the region index
        out.update(os_img_s=osp["images"] / osp["seconds"], os_steady_img_s=osp.get("steady_img_s"), regions_s=ex.get("regions_s"))
    if n and ecfg.raw_forward_images > 0:
        raw = _measured(ecfg, cfg_path, cfg, "raw", str(ecfg.raw_forward_images))
        rate = raw.get("raw_forward_img_s")
        out.update(raw_forward_img_s=rate, raw_images=raw.get("raw_images"),
                   ratio=out["img_s"] / rate if rate and out["img_s"] else None,
                   steady_ratio=out["steady_img_s"] / rate if rate and out["steady_img_s"] else None)
        log.info("experiment: extraction %.1f img/s end to end (%s from its first descriptors on), the model actors' forward passes "
                 "%s img/s meanwhile, the forward pass alone %.1f img/s afterwards", out["img_s"] or 0.0,
                 f"{out['steady_img_s']:.1f}" if out["steady_img_s"] else "-", f"{out['model_img_s']:.1f}" if "model_img_s" in out else "-",
                 rate or 0.0)
    return out


def run_experiment(ecfg: ExperimentConfig) -> list[dict]:
    """Every level of the experiment (skipping recorded ones); returns the level records."""
    out = Path(ecfg.out).resolve()
    cfg = run_config(ecfg)
    d = ecfg.distractors  # the generator of synthetic distractors does not matter for a folder of one's own
    eparams = params_hash({"run": config_to_dict(cfg), "distractors": dataclasses.replace(d, generator=0) if d.source else d})
    meta = read_json_or(out / "experiment.json", {})
    if meta and meta.get("params") != eparams:
        raise ConfigError(f"experiment: {out} holds an experiment run with other settings (base config, methods, distractors "
                          "or the synthetic distractors' generator); "
                          "use another out, or delete it to start again")
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "run.toml"
    pending = any(_recorded(out, level, eparams) is None for level in ecfg.levels)
    shared = _shared_ray(ecfg, cfg) if pending else None
    try:
        write_bytes(config_to_toml(cfg).encode(), cfg_path)  # what each stage's process loads
        return _levels(ecfg, cfg, cfg_path, eparams, shared)
    finally:
        if shared:
            from cluster.extract_actors import stop_pool
            from cluster.ray_runtime import shutdown_ray

            stop_pool()  # the model actors kept across levels
            if shared["ray_started"]:
                shutdown_ray()


def _recorded(out: Path, level: int, eparams: str) -> dict | None:
    """The record of `level` when that level is done with these settings, else None."""
    rec = read_json_or(out / "levels" / f"{level:09d}.json", None)
    return rec if isinstance(rec, dict) and rec.get("params") == eparams else None


def _shared_ray(ecfg: ExperimentConfig, cfg: RunConfig) -> dict | None:
    """One Ray for every stage of every level, started here, when the stages run in processes of their
    own on the embedded Ray: each stage joins it instead of starting its own (~4 s each), and with
    the ray_actors engine the model actors are started once, before the first level, and kept warm
    across levels (the extraction's first descriptors in 0.3 s instead of 6.5-8: BENCHMARKS.md).
    Sets the stages' `ray_address` (and `extract.keep_actors`) in `cfg`; returns the start-up
    times, or None (stages start their own Ray, or join the cluster the base config names)."""
    from .run import ray_users

    if not ecfg.isolate or cfg.ray_address or not ray_users(cfg, list(STAGES)):
        return None
    from cluster.ray_runtime import cluster_address, init_ray, ray_is_up

    t0 = time.perf_counter()
    if cfg.extract.engine != "local":
        import torch  # noqa: F401 (before Ray: see run.start_engines)
    started = not ray_is_up()  # else this process's Ray (a caller's) is joined, and left running
    init_ray()
    cfg.ray_address = cluster_address()
    shared = {"ray_start_s": time.perf_counter() - t0, "ray_started": started}
    if cfg.extract.engine == "ray_actors":
        from .extract import warm_model_actors

        t0 = time.perf_counter()
        cfg.extract.keep_actors = True
        warm_model_actors(cfg.extract)
        shared["model_actors_start_s"] = time.perf_counter() - t0
    log.info("experiment: one Ray for every stage at %s (%s)", cfg.ray_address,
             ", ".join(f"{k} {v:.1f} s" for k, v in shared.items() if k.endswith("_s")))
    return shared


def _levels(ecfg: ExperimentConfig, cfg: RunConfig, cfg_path: Path, eparams: str, shared: dict | None) -> list[dict]:
    from .run import resolve_dataset

    out, run = Path(ecfg.out).resolve(), Path(cfg.out)
    records, prev = [], 0
    for li, level in enumerate(ecfg.levels):
        rec_path = out / "levels" / f"{level:09d}.json"
        rec = _recorded(out, level, eparams)
        if rec is not None:
            log.info("experiment: level %d recorded, skipping", level)
            records.append(rec)
            prev = level
            continue
        log.info("experiment: level %d (%d distractors to add)", level, level - prev)
        stages = {}
        if li == 0:
            stages["ingest"] = _measured(ecfg, cfg_path, cfg, "ingest")
            n_base = read_json(run / "ingest.json")["images"]
            write_json({"params": eparams, "base_images": n_base, "config": str(ecfg.base)}, out / "experiment.json")
        n_base = read_json(out / "experiment.json")["base_images"]
        if level > prev or (li == 0 and level > 0):
            t0 = time.perf_counter()
            batch = _distractor_batch(ecfg, cfg, prev, level)
            gen = time.perf_counter() - t0
            stages["add"] = {**_measured(ecfg, cfg_path, cfg, "add", batch), "distractor_seconds": gen}
        for s in STAGES:
            stages[s] = _measured(ecfg, cfg_path, cfg, s)
            if s == "extract":
                extraction = _extraction(ecfg, cfg_path, cfg, run)
        resolve_dataset(cfg, run)
        evaluation = read_json(run / "evaluation.json")
        stats = read_json_or(run / "ranks" / "stats.json", {})
        rec = {
            "level": level, "database": int(read_json(run / "ingest.json")["images"]), "base_images": n_base,
            "stages": stages,
            "metrics": {m: {p: {"map": v["map"], "mpk": v.get("mpk", {})} for p, v in e.items()} for m, e in evaluation["methods"].items()},
            "queries_per_s": {m: (s.get("queries") / s["seconds"] if s.get("seconds") else None) for m, s in stats.items() if isinstance(s, dict)},
            "distraction": _distraction(cfg, run, n_base), "extraction": extraction,
            "run": str(run), "snapshot": f"levels/{level:09d}", "params": eparams, "shared_ray": shared,
        }
        _snapshot(run, out / "levels" / f"{level:09d}")
        write_json(rec, rec_path)  # the level counts as done only now
        records.append(rec)
        prev = level
    write_results(out, records)
    return records


def write_results(out: Path, records: list[dict]) -> None:
    """results.json, results.parquet (one row per level x method x protocol) and results.html."""
    import pyarrow as pa

    from .experiment_report import results_html
    from .shards import write_table

    write_json(records, out / "results.json")
    rows = [{"level": r["level"], "database": r["database"], "method": m, "protocol": p, "map": v["map"],
             "mp10": v["mpk"].get("10"), "queries_per_s": r["queries_per_s"].get(m)}
            for r in records for m, e in r["metrics"].items() for p, v in e.items()]
    write_table(pa.Table.from_pylist(rows), out / "results.parquet")
    write_bytes(results_html(records).encode(), out / "results.html")


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: run one step of a level and write its peak RSS (and what it measured) as
    JSON to `--result`."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--child", required=True)
    ap.add_argument("--run-config", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--images")
    a = ap.parse_args(argv)
    setup_logging()  # as the CLI's (each stage of a level runs here, in its own process)
    from .user_errors import is_user_error, one_line

    try:
        got = _stage(load_config(a.run_config), a.child, a.images)
    except Exception as e:
        if not is_user_error(e):  # the CLI's user errors, on one line; a bug shows its traceback
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    write_json({"peak_rss_gib": own_peak_gib(), **got}, Path(a.result))  # its own: not the runner's RSS it was forked with
    return 0


if __name__ == "__main__":
    sys.exit(main())
