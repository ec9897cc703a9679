"""`retrieval run`: benchmark (optional) -> ingest -> extract -> graph -> query -> evaluate -> report."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .config import GRAPH_METHODS, REGION_METHODS, RunConfig, config_to_dict  # the rankers' names without their imports (0.3-0.4 s)
from .shards import read_json, write_json

log = logging.getLogger(__name__)


def resolve_dataset(cfg: RunConfig, run_dir: Path) -> None:
    """Fill cfg.dataset from the synthetic benchmark when it is enabled (building it if needed)."""
    if cfg.benchmark.enabled:
        from .benchmark_data import build_benchmark

        bdir = run_dir / "benchmark"
        build_benchmark(cfg.benchmark, bdir)
        cfg.dataset.database = str(bdir / "db")
        cfg.dataset.queries = str(bdir / "queries")
        cfg.dataset.gnd = str(bdir / "gnd.json")



def query_boxes(cfg: RunConfig) -> dict | None:
    """Query key -> bbox from the ground truth, matched by file stem."""
    if not cfg.dataset.gnd or not cfg.dataset.queries:
        return None
    from .groundtruth import read_ground_truth
    from .ingest import list_sources

    gt = read_ground_truth(cfg.dataset.gnd)
    by_stem = {Path(q).with_suffix("").as_posix(): g.get("bbx") for q, g in zip(gt.qimlist, gt.gnd)}
    out = {}
    for s in list_sources(cfg.dataset.queries, cfg.ingest):
        box = by_stem.get(Path(s.key).with_suffix("").as_posix())
        if box is not None:
            out[s.key] = box
    return out


def stage_ingest(cfg: RunConfig, run_dir: Path) -> dict:
    from .ingest import ingest

    if not cfg.dataset.database:  # run_stages resolved the dataset (benchmark built if enabled)
        raise ValueError("config: set [dataset].database (or enable [benchmark])")
    out = {"database": ingest(cfg.dataset.database, run_dir, cfg.ingest)}
    if cfg.dataset.queries:
        out["queries"] = ingest(cfg.dataset.queries, run_dir / "queries", cfg.ingest, boxes=query_boxes(cfg))
    return out


def stage_extract(cfg: RunConfig, run_dir: Path) -> dict:
    from .extract import load_whitening, run_extract

    out = {"database": run_extract(run_dir, cfg.extract, learn=True, gcfg=cfg.graph)}
    db = out["database"]  # what the last extraction that did work took (only new shards after `add`): rates per experiment level
    if db.get("images"):  # a rerun with every shard done keeps the record of the run that did them
        keys = ("images", "seconds", "first_result_s", "steady_img_s", "model_img_s", "shards")
        rec = {k: db.get(k) for k in keys}
        if "os" in db:  # os_egm: the first (FS.EGM) pass above, the region index and the OS.EGM pass
            rec.update(regions_s=db.get("regions_s"), os={k: db["os"].get(k) for k in keys if k != "shards"})
        write_json(rec, run_dir / "extract.json")
    if (run_dir / "queries" / "images").is_dir():
        w = load_whitening(run_dir / "whitening.npz") if cfg.extract.whitening != "none" else None
        out["queries"] = run_extract(run_dir / "queries", cfg.extract, with_boxes=True, whitening=w, learn=False, run_dir=run_dir,
                                     gcfg=cfg.graph)
    return out


def stage_train(cfg: RunConfig, run_dir: Path) -> dict:
    """Fine-tune ([train]); extraction then uses the final checkpoint (skipped when it exists)."""
    from .train import run_train

    res = run_train(run_dir, cfg.train)
    cfg.extract.backbone, cfg.extract.weights = cfg.train.backbone, res["checkpoint"]
    log.info("train: extraction will use %s", res["checkpoint"])
    return res


def stage_graph(cfg: RunConfig, run_dir: Path) -> dict:
    from .graph import run_graph

    res = run_graph(run_dir, cfg.graph)
    if REGION_METHODS & set(cfg.query.methods):  # regional diffusion: the region graph too
        from .regions import run_region_graph

        from .discover import first_pass
        from .extract import feature_params

        ecfg = first_pass(cfg.extract) if cfg.extract.pooling == "os_egm" else cfg.extract
        res = {**res, "regions": run_region_graph(run_dir, cfg.graph, ecfg, features=feature_params(ecfg))}
    return res


def stage_query(cfg: RunConfig, run_dir: Path) -> dict:
    from .query import run_query
    from .report import write_report

    res = run_query(run_dir, run_dir / "queries", cfg.query)
    if not cfg.dataset.gnd and not cfg.benchmark.enabled:  # no ground truth, no evaluate: the report still shows setup and results
        report = write_report(run_dir, db_keys=_db_keys(run_dir), query_dir=run_dir / "queries", n_queries=cfg.evaluate.report_queries,
                              topk=cfg.evaluate.report_topk, extra_html=_training_html(cfg, run_dir))
        log.info("query: report (results without ground truth) in %s", report)
    return res


def _db_keys(run_dir: Path) -> list[str]:
    """Database keys indexed by image id ("" for ids that have no descriptor)."""
    from .descriptors import load_descriptors

    ids, keys, _ = load_descriptors(run_dir / "descriptors", dense=False)
    db_keys = [""] * (int(ids.max()) + 1 if len(ids) else 0)
    for i, k in zip(ids.tolist(), keys):
        db_keys[i] = k
    return db_keys


def _training_html(cfg: RunConfig, run_dir: Path) -> str:
    from .report import training_html

    log_path = Path(cfg.train.out or run_dir / "train") / "metrics.jsonl"
    return training_html([json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.is_file() else [])


def stage_evaluate(cfg: RunConfig, run_dir: Path) -> dict:
    from .evaluate import format_table, run_evaluate
    from .groundtruth import read_ground_truth
    from .report import write_report

    if not cfg.dataset.gnd:  # resolved by run_stages
        raise ValueError("config: evaluation needs [dataset].gnd (or an enabled [benchmark])")
    db_keys = _db_keys(run_dir)
    metrics = run_evaluate(run_dir, Path(cfg.dataset.gnd), cfg.evaluate, db_keys=db_keys, methods=cfg.query.methods)
    report = write_report(run_dir, db_keys=db_keys, query_dir=run_dir / "queries", gt=read_ground_truth(cfg.dataset.gnd),
                          evaluation=read_json(run_dir / "evaluation.json"), n_queries=cfg.evaluate.report_queries,
                          topk=cfg.evaluate.report_topk, extra_html=_training_html(cfg, run_dir) + _discovery_html(cfg, run_dir))
    log.info("evaluate: mAP (%%)\n%s", format_table(metrics))
    return {"metrics": metrics, "report": str(report)}


def _discovery_html(cfg: RunConfig, run_dir: Path) -> str:
    """FS and OS maps of a few database images, for runs that pool with object discovery."""
    if cfg.extract.pooling != "os_egm" or cfg.evaluate.report_queries <= 0:
        return ""
    from .discover import saliency_html

    return saliency_html(run_dir, cfg.extract, n=cfg.evaluate.report_queries)


def ray_users(cfg: RunConfig, stages: list[str]) -> list[str]:
    """The stages of this run that use Ray with this configuration (each names why)."""
    uses = {"extract": cfg.extract.engine != "local", "graph": cfg.graph.engine == "ray", "train": cfg.train.engine == "ray",
            "query": "petsc" in cfg.query.methods and cfg.query.petsc_launch == "ray"}
    return [s for s in stages if uses.get(s)]


def start_engines(cfg: RunConfig, stages: list[str]) -> None:
    """Start (or join, from `ray_address`) Ray once, when one of `stages` uses it: the one place a
    run starts Ray. The engines in cluster/ never start it themselves."""
    users = ray_users(cfg, stages)
    if users:
        from cluster.ray_runtime import init_ray

        if {"extract", "train"} & set(stages):
            # torch is loaded before Ray connects: in a Ray job driver, loading it after `ray.init`
            # aborted the process ("Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so")
            import torch  # noqa: F401

        log.info("ray: needed by %s", ", ".join(users))
        init_ray(cfg.ray_address)


def missing_inputs(cfg: RunConfig, run_dir: Path, stages: list[str]) -> str | None:
    """Why `stages` cannot run on `run_dir` (a stage's input is neither there nor made by an earlier
    stage of this run), naming the stage to run first; None when they can. Checked before any
    engine starts, so a wrong order fails in a second, not after Ray's start-up."""
    made: set[str] = set()
    produces = {"ingest": "images", "extract": "descriptors", "graph": "graph", "query": "ranks"}
    present = {"images": any((run_dir / "images").glob("part-*.parquet")),
               "descriptors": (run_dir / "manifest.json").is_file() and (run_dir / "descriptors").is_dir(),
               "graph": (run_dir / "graph" / "manifest.json").is_file(),
               "ranks": any((run_dir / "ranks").glob("*.parquet"))}
    needs = {"extract": ["images"], "graph": ["descriptors"], "evaluate": ["ranks"],
             "query": ["descriptors"] + (["graph"] if GRAPH_METHODS & set(cfg.query.methods) else []),
             "train": [] if cfg.train.images else ["images"]}
    by = {v: k for k, v in produces.items()}
    for s in stages:
        for need in needs.get(s, []):
            if need not in made and not present[need]:
                return (f"{s}: {run_dir} has no {need} yet: run the {by[need]} stage first "
                        f"(`retrieval {by[need]} CONFIG`, or `retrieval run CONFIG` for every stage)")
        if s in produces:
            made.add(produces[s])
    return None


# stages that only read the run's outputs (their results are metrics and the report): they leave
# config.resolved.json, which records the configuration that produced the outputs, as it is
READ_ONLY_STAGES = {"evaluate"}
STAGES = {"ingest": stage_ingest, "train": stage_train, "extract": stage_extract, "graph": stage_graph, "query": stage_query,
          "evaluate": stage_evaluate}


def run_stages(cfg: RunConfig, stages: list[str]) -> dict:
    """Run the named stages in order on cfg.out; saves the resolved config (when a stage produces
    outputs from it: not for evaluate alone) and per-stage timings.

    With [train].enabled, extraction is preceded by the train stage (a no-op once its final
    checkpoint exists), so `run` and `extract` use the fine-tuned network."""
    if cfg.train.enabled and "extract" in stages and "train" not in stages:
        stages = stages[: stages.index("extract")] + ["train"] + stages[stages.index("extract") :]
    if not cfg.out:
        raise ValueError("config: no run directory: set `out` (or pass --out)")
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if "ingest" in stages or "evaluate" in stages:
        resolve_dataset(cfg, run_dir)
    why = missing_inputs(cfg, run_dir, stages)
    if why:
        raise ValueError(why)
    if set(stages) - READ_ONLY_STAGES:  # the configuration that produced the outputs; evaluating them changes nothing
        write_json(config_to_dict(cfg), run_dir / "config.resolved.json")
    start_engines(cfg, stages)
    timings, results = {}, {}
    for s in stages:
        t0 = time.perf_counter()
        log.info("== stage %s ==", s)
        results[s] = STAGES[s](cfg, run_dir)
        timings[s] = round(time.perf_counter() - t0, 2)
        log.info("stage %s done in %.1f s", s, timings[s])
        # one timings record per run directory: each stage's latest time, written as it finishes
        tpath = run_dir / "timings.json"
        write_json({**(read_json(tpath) if tpath.is_file() else {}), s: timings[s]}, tpath)
    results["timings"] = timings
    return results
