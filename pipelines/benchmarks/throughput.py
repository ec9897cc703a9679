"""Extraction throughput: the whole pipeline (Parquet shards -> written descriptors) against the raw
forward pass of the same model on the same images, measured side by side in one run.

    python -m pipelines.benchmarks.throughput --config deploy/configs/demo.toml --images 480

Raw forward: images decoded and resized beforehand, then only `features` + pooling timed, with
the same torch thread count the pipeline's actor uses. Pipeline: `extract_features` on fresh
copies of the image shards, with each Ray engine `--repeat` times (Ray Data's actor pool, `ray`, and
the warm model actors, `ray_actors`, whose first run starts them and whose later runs reuse them;
the in-process engine once for reference), each reported end to end and from its first descriptors
on (the steady rate, without the one-time start of the actors and of Ray Data's tasks). Ratios are
against the mean of the raw rate measured before and after the runs, and (`ratio_to_model`) against
the rate of the model's forward passes during the same run, read from the warm actors' clocks.
Also decoding's rate on one CPU (what a decode task does), which sizes the CPUs a GPU needs.
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

log = logging.getLogger("throughput")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deploy/configs/demo.toml")
    ap.add_argument("--images", type=int, default=480, help="images taken from the run's shards")
    ap.add_argument("--out", type=Path, default=Path("runs/throughput.json"))
    ap.add_argument("--passes", type=int, default=1, help="the pipeline runs over the shards this many times (copies): a longer job")
    ap.add_argument("--repeat", type=int, default=3, help="pipeline runs per Ray engine (between two raw measurements)")
    ap.add_argument("--engines", nargs="+", default=["ray", "ray_actors"], choices=["ray", "ray_actors"],
                    help="Ray extraction engines measured (ray_actors: the first run starts the model actors, the others reuse them)")
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
    runs: dict[str, list[dict]] = {e: [] for e in a.engines}
    # each Ray engine's runs together: the ray engine stops kept model actors (they would hold its read
    # tasks' CPUs), so alternating would start ray_actors cold every time; its first run is cold, the
    # rest find the actors the first one kept
    for engine in [e for e in a.engines for _ in range(a.repeat)] + ["local"]:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp)
            (run / "images").mkdir()
            for k in range(a.passes):
                for p in shards:
                    shutil.copy(p, run / "images" / (p.name if k == 0 else f"{p.stem}-copy{k}{p.suffix}"))
            summary = extract_features(run / "images", run, dataclasses.replace(cfg.extract, engine=engine,
                                                                                keep_actors=engine == "ray_actors"))
        rate, model = summary["images"] / summary["seconds"], summary["model_img_s"]
        log.info("pipeline (%s): %.1f img/s end to end, first descriptors after %.1f s, %.1f img/s from then on; its model's forward "
                 "passes alone %s img/s meanwhile", engine, rate, summary["first_result_s"], summary["steady_img_s"] or 0.0,
                 f"{model:.1f}" if model else "-")
        if engine == "local":
            res["pipeline_local_img_s"], res["local_model_img_s"] = rate, model
        else:
            runs[engine].append({"img_s": rate, "first_result_s": summary["first_result_s"], "steady_img_s": summary["steady_img_s"],
                                 "model_img_s": model})
    from cluster.extract_actors import stop_pool

    stop_pool()
    res["raw_forward_after_img_s"] = raw_forward_rate(cfg.extract, imgs)  # the machine drifts: the reference again, after
    log.info("raw forward after the runs: %.1f img/s", res["raw_forward_after_img_s"])
    raw = (res["raw_forward_img_s"] + res["raw_forward_after_img_s"]) / 2
    res["runs"] = runs
    res["ratio_to_raw"] = {e: [r["img_s"] / raw for r in rs] for e, rs in runs.items()}
    res["steady_ratio_to_raw"] = {e: [r["steady_img_s"] / raw for r in rs if r["steady_img_s"]] for e, rs in runs.items()}
    res["ratio_local_to_raw"] = res["pipeline_local_img_s"] / raw
    # against each run's own model clock (the actors' CPU seconds in the forward pass during that run: no drift between the two)
    res["ratio_to_model"] = {e: [r["img_s"] / r["model_img_s"] for r in rs if r["model_img_s"]] for e, rs in runs.items()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
