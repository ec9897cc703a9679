"""Extraction throughput: the whole pipeline (Parquet shards -> written descriptors) against the raw
forward pass of the same model on the same images, measured side by side in one run.

    python -m pipelines.benchmarks.throughput --config deploy/configs/demo.toml --images 480

Raw forward: images decoded and resized beforehand, then only `features` + pooling timed, with
the same torch thread count the pipeline's actor uses. Pipeline: `extract_features` on fresh
copies of the image shards, with the Ray engine `--repeat` times (and the in-process engine for
reference), each reported end to end and from its first descriptors on (the steady rate, without
the one-time start of the actor and of Ray Data's tasks). Also decoding's rate on one CPU (what a
decode task does), which sizes the CPUs a GPU needs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


log = logging.getLogger("throughput")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/configs/demo.toml")
    ap.add_argument("--images", type=int, default=480, help="images taken from the run's shards")
    ap.add_argument("--out", type=Path, default=Path("runs/throughput.json"))
    ap.add_argument("--passes", type=int, default=1, help="the pipeline runs over the shards this many times (copies): a longer job")
    ap.add_argument("--repeat", type=int, default=3, help="Ray pipeline runs (side by side with one raw measurement)")
    a = ap.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.benchmarks import ingested_run
    from pipelines.extract import extract_features
    from pipelines.decode import prepare
    from pipelines.extractor import forward_processes, forward_threads, raw_forward_rate
    from pipelines.shards import list_shards

    cfg, base = ingested_run(a.config)
    shards, n = [], 0
    for p in list_shards(base / "images"):
        if n >= a.images:
            break
        shards.append(p)
        n += pq.read_metadata(p).num_rows
    threads = forward_threads(cfg.extract)
    res = {"images": n, "passes": a.passes, "shards": len(shards), "max_side": cfg.extract.max_side, "backbone": cfg.extract.backbone,
           "actors": cfg.extract.actors, "actor_num_cpus": cfg.extract.actor_num_cpus, "torch_threads": threads}

    # raw forward on pre-decoded inputs (one process per model actor on a CPU, as the actors run)
    imgs = pa.concat_tables([pq.read_table(p, columns=["image"]) for p in shards]).column("image").to_pylist()
    res["raw_processes"] = forward_processes(cfg.extract)
    res["raw_forward_img_s"] = raw_forward_rate(cfg.extract, imgs)  # each process on an actor's torch threads
    log.info("raw forward: %.1f img/s in %d process(es)", res["raw_forward_img_s"], res["raw_processes"])

    # decoding (what the decode tasks do: decode + resize) on one CPU, for the CPU:GPU sizing
    t0 = time.perf_counter()
    for b in imgs:
        prepare(b, None, cfg.extract)
    res["decode_img_s_per_cpu"] = n / (time.perf_counter() - t0)
    log.info("decode: %.1f img/s on one CPU", res["decode_img_s_per_cpu"])

    from cluster.ray_runtime import init_ray

    init_ray(cfg.ray_address)
    ray_runs = []
    for engine in ["ray"] * a.repeat + ["local"]:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp)
            (run / "images").mkdir()
            for k in range(a.passes):
                for p in shards:
                    shutil.copy(p, run / "images" / (p.name if k == 0 else f"{p.stem}-copy{k}{p.suffix}"))
            summary = extract_features(run / "images", run, dataclasses.replace(cfg.extract, engine=engine))
        rate = summary["images"] / summary["seconds"]
        log.info("pipeline (%s): %.1f img/s end to end, first descriptors after %.1f s, %.1f img/s from then on", engine, rate,
                 summary["first_result_s"], summary["steady_img_s"] or 0.0)
        if engine == "ray":
            ray_runs.append({"img_s": rate, "first_result_s": summary["first_result_s"], "steady_img_s": summary["steady_img_s"]})
        else:
            res["pipeline_local_img_s"] = rate
    res["ray_runs"] = ray_runs
    res["pipeline_ray_img_s"] = float(np.median([r["img_s"] for r in ray_runs]))
    res["ratio_ray_to_raw"] = [r["img_s"] / res["raw_forward_img_s"] for r in ray_runs]
    res["steady_ratio_ray_to_raw"] = [r["steady_img_s"] / res["raw_forward_img_s"] for r in ray_runs if r["steady_img_s"]]
    res["ratio_local_to_raw"] = res["pipeline_local_img_s"] / res["raw_forward_img_s"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
