"""Command-line interface: `retrieval run CONFIG` or one stage at a time.

An error the user can act on (a bad configuration or input, a refused token, a port in use: the
project's error types, `ValueError` and `FileNotFoundError`; a full disk, an exceeded quota, a
read-only or refused path) is printed as one line `error: ...` with exit status 2; any other
exception is a bug and shows its traceback. `--debug` shows the traceback of every error.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from .config import EXTRACT_ENGINES, GRAPH_ENGINES, TRAIN_ENGINES, RunConfig, absolute_paths, load_config
from .config_toml import config_to_toml
from .logs import setup_logging
from .user_errors import is_user_error, one_line

log = logging.getLogger("retrieval")
STAGE_ORDER = ["ingest", "extract", "graph", "query", "evaluate"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval", description="Batch indexing for image retrieval with diffusion ranking.")
    p.add_argument("--debug", action="store_true", help="show the traceback of any error (not only of unexpected ones)")
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the command (SUPPRESS: absent, it keeps the top level's)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of any error")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    for name, help_ in [("run", "all stages: ingest, extract, graph, query, evaluate (+ report)")] + [
        (s, f"the {s} stage only") for s in STAGE_ORDER
    ]:
        sp = add(name, help=help_)
        sp.add_argument("config", help="TOML run configuration (see deploy/configs/demo.toml)")
        sp.add_argument("--out", help="run directory (overrides `out` in the config)")
        if name in ("run", "extract"):
            sp.add_argument("--engine", choices=list(EXTRACT_ENGINES), help="extraction engine (overrides [extract].engine)")
        elif name == "graph":
            sp.add_argument("--engine", choices=list(GRAPH_ENGINES), help="graph engine (overrides [graph].engine)")
        if name == "query":
            sp.add_argument("--queries", help="batch query job: Parquet file of queries (`key`, optional `vector` or `image`)")
            sp.add_argument("--methods", help="comma-separated methods for the batch job (default: [query].methods)")
            sp.add_argument("--topk", type=int, default=100, help="batch job: results kept per query")
            sp.add_argument("--chunk", type=int, default=4096, help="batch job: queries per output shard")
            sp.add_argument("--batch-out", help="batch job output folder (default RUN/batch/<file stem>)")
    tr = add("train", help="unsupervised fine-tuning ([train]); resumes from the latest checkpoint")
    tr.add_argument("config", help="TOML run configuration")
    tr.add_argument("--out", help="run directory (overrides `out` in the config)")
    tr.add_argument("--engine", choices=list(TRAIN_ENGINES), help="training engine (overrides [train].engine)")
    tr.add_argument("--workers", type=int, help="Ray Train workers (overrides [train].num_workers)")
    srv = add("serve", help="query service on Ray Serve over a finished run directory")
    srv.add_argument("run_dir", help="a finished run directory (descriptors, and the graph for diffusion)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port of the service (default 8000)")
    srv.add_argument("--replicas", type=int, default=1, help="replicas, each holding the whole index")
    srv.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    srv.add_argument("--max-batch", type=int, default=16, help="requests batched into one solve")
    srv.add_argument("--batch-wait-fraction", type=float, default=0.02,
                     help="a batch waits for more requests this fraction of recent batches' ranking time (0: never waits; "
                          "no wait after a batch of 32 queries or more)")
    srv.add_argument("--max-queries", type=int, default=1024, help="queries per request")
    srv.add_argument("--address", default="", help="Ray cluster to join (default: embedded local Ray)")
    smt = add("submit", help="submit a pipeline run to a Ray cluster (Ray Jobs API)")
    smt.add_argument("config", help="TOML run configuration (packaged with the code as the job's working directory)")
    smt.add_argument("--address", default="", help="the cluster's job API, http://HEAD:8265 (or RAY_ADDRESS)")
    smt.add_argument("--out", help="run directory (on storage every node sees)")
    smt.add_argument("--stage", default="run", choices=["run"] + STAGE_ORDER, help="what to run (default: all stages)")
    smt.add_argument("--wait", action="store_true", help="follow the logs until the job ends; exit status follows the job's")
    for name, help_ in [("status", "a submitted job's status"), ("logs", "a submitted job's logs")]:
        sp = add(name, help=help_)
        sp.add_argument("job", help="the job id `submit` printed (for a run directory: retrieval show RUN)")
        sp.add_argument("--address", default="", help="the cluster's job API, http://HEAD:8265 (or RAY_ADDRESS)")
        if name == "logs":
            sp.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    addp = add("add", help="add images to a finished run: only they are ingested and extracted, ids never change, the graph is updated")
    addp.add_argument("config", help="TOML run configuration of the run to grow")
    addp.add_argument("--images", required=True, help="the new images: a folder, a .txt list of paths, or a Parquet file")
    addp.add_argument("--out", help="run directory (overrides `out` in the config)")
    exp = add("experiment", help="a scaling experiment: a base collection, then levels of added distractors (resumable)")
    exp.add_argument("config", help="TOML experiment configuration (e.g. deploy/experiments/demo-distractors.toml)")
    shw = add("show", help="what a run directory holds: stages done, sizes, timings, mAP, where the report and ranks are")
    shw.add_argument("run_dir", help="a run directory (the config's `out`)")
    cfgp = add("config", help="print a configuration as TOML: every default, or a file's resolved values")
    cfgp.add_argument("config", nargs="?", help="TOML run configuration (omit for the defaults)")
    cfgp.add_argument("--defaults", action="store_true", help="print the built-in defaults (the same as omitting CONFIG)")
    imp = add("import-descriptors", help="precomputed descriptors (.npy/.fvecs/.mat/.parquet) -> descriptor shards")
    imp.add_argument("database", help="database descriptors file, rows are descriptors")
    imp.add_argument("--out", required=True, help="run directory to create")
    imp.add_argument("--keys", help="text file, one image key per line (default db00000000, ...)")
    imp.add_argument("--queries", help="query descriptors file (same format)")
    imp.add_argument("--query-keys", help="text file of query keys")
    imp.add_argument("--variable", default="", help=".mat variable holding the matrix")
    imp.add_argument("--transpose", action="store_true", help="the file stores one descriptor per column (d x n)")
    imp.add_argument("--shard-size", type=int, default=100_000)
    return p


def _job_workdir(args: argparse.Namespace) -> None:
    """In a job submitted by `retrieval submit`, work from the run directory (see
    cluster.job_env.JOB_DIR_ENV): the config path is made absolute first."""
    import os

    from cluster.job_env import JOB_DIR_ENV

    job_dir = os.environ.get(JOB_DIR_ENV)
    if not job_dir:
        return
    if getattr(args, "config", None):
        args.config = str(Path(args.config).resolve())
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    os.chdir(job_dir)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _job_workdir(args)
    setup_logging()
    try:
        return _command(args)
    except Exception as e:
        if not is_user_error(e):
            raise  # a bug: its traceback shows
        if args.debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def _command(args) -> int:
    if args.command == "import-descriptors":
        from .import_descriptors import import_descriptors

        import_descriptors(Path(args.out), Path(args.database), keys=args.keys, queries=args.queries, query_keys=args.query_keys,
                           variable=args.variable, transpose=args.transpose, shard_size=args.shard_size)
        print(f"descriptors: {Path(args.out) / 'descriptors'}")
        return 0
    if args.command == "show":
        from .show import run_summary

        print("\n".join(run_summary(args.run_dir)))
        return 0
    if args.command == "experiment":
        from .experiment import load_experiment, run_experiment

        ecfg = load_experiment(args.config)
        records = run_experiment(ecfg)
        for r in records:
            maps = ", ".join(f"{m} {e.get('H', next(iter(e.values())))['map']:.2f}" for m, e in r["metrics"].items())
            print(f"{r['level']:>9} distractors, {r['database']:>9} images: {maps}")
        print(f"results: {Path(ecfg.out) / 'results.html'}")
        return 0
    if args.command == "config":
        cfg = load_config(args.config) if args.config and not args.defaults else RunConfig()
        print(config_to_toml(cfg), end="")
        return 0
    if args.command in ("status", "logs") and Path(args.job).is_dir():
        raise ValueError(f"{args.command} reports a job submitted to a cluster; {args.job} is a run directory: "
                         f"use `retrieval show {args.job}`")
    if args.command in ("serve", "submit", "status", "logs"):
        return _cluster_command(args)
    cfg = load_config(args.config)
    logging.getLogger().setLevel(cfg.log_level)
    if args.out:
        cfg.out = args.out
    if args.command == "train":
        return _train(cfg, args)
    if args.command == "add":
        from .ingest import ingest_added
        from .run import run_stages
        from .show import run_summary

        res = ingest_added(args.images, cfg.out, cfg.ingest)
        print(f"added {res['appended']} image(s) from {args.images}; {res['images']} in the collection")
        run_stages(cfg, ["extract", "graph"])
        print("\n".join(run_summary(cfg.out)))
        return 0
    if getattr(args, "engine", None):
        if args.command == "graph":
            cfg.graph.engine = args.engine
        else:
            cfg.extract.engine = args.engine
    from .evaluate import format_table
    from .run import run_stages

    if args.command == "query" and args.queries:
        return _batch_query(cfg, args)
    stages = STAGE_ORDER if args.command == "run" else [args.command]
    if args.command == "run" and not cfg.benchmark.enabled:  # an indexing run may have no queries or ground truth
        skip = {"query", "evaluate"} if not cfg.dataset.queries else ({"evaluate"} if not cfg.dataset.gnd else set())
        if skip:
            log.warning("run: no %s in [dataset]: skipping %s", "queries" if "query" in skip else "ground truth", sorted(skip))
        stages = [s for s in stages if s not in skip]
    res = run_stages(cfg, stages)
    if "evaluate" in res:
        out = Path(cfg.out)
        print("\nmAP (%)\n" + format_table(res["evaluate"]["metrics"]))
        print(f"\nresults: {out / 'metrics.json'}\nreport:  {res['evaluate']['report']}\nranks:   {out / 'ranks'}")
        print(f"timings (s): {res['timings']}")
    else:  # no ground truth: still say what the run holds and where
        from .show import run_summary

        print("\n" + "\n".join(run_summary(cfg.out)))
    return 0


def _train(cfg, args) -> int:
    from .run import start_engines
    from .train import run_train

    if args.engine:
        cfg.train.engine = args.engine
    if args.workers:
        cfg.train.num_workers = args.workers
    start_engines(cfg, ["train"])
    res = run_train(Path(cfg.out), cfg.train)  # CheckpointError is a WeightsError
    print(f"checkpoint: {res['checkpoint']}\nlast epoch: {res['last']}")
    return 0


def _batch_query(cfg, args) -> int:
    from .batch_query import run_batch_query
    from .service import QueryIndex

    methods = args.methods.split(",") if args.methods else cfg.query.methods
    out = Path(args.batch_out) if args.batch_out else Path(cfg.out) / "batch" / Path(args.queries).stem
    index = QueryIndex(cfg.out, query=cfg.query)
    summary = run_batch_query(index, args.queries, out, methods=methods, topk=args.topk, chunk=args.chunk)
    for m, info in summary.items():
        print(f"{m}: {info['ranked']} ranked, {info['rejected']} rejected, {info['chunks_skipped']} chunks skipped, "
              f"{info['queries_per_s']} queries/s -> {out / m}")
    return 0


def _cluster_command(args) -> int:
    import time

    if args.command == "serve":
        from cluster.ray_runtime import init_ray
        from cluster.ray_serve import check_port, replica_urls, start_service, stop_service

        from .service import ServiceLimits

        # checked before Ray starts (seconds); the port only when the proxy will run on this machine
        if not (Path(args.run_dir) / "descriptors").is_dir():
            raise FileNotFoundError(f"serve: {args.run_dir} has no descriptors/ (run the pipeline first)")
        if not args.address:
            check_port(args.host, args.port)
        import signal

        def stop(signum, frame):  # SIGTERM (a service manager, `kill`) stops it as quietly as Ctrl-C
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:  # a stop while the service is still starting is a stop too, not a traceback
            init_ray(args.address)
            signal.signal(signal.SIGTERM, stop)  # Ray installs its own SIGTERM handler when it starts: ours again
            url = start_service(args.run_dir, host=args.host, port=args.port, replicas=args.replicas, num_cpus=args.num_cpus,
                                limits=ServiceLimits(max_queries=args.max_queries), max_batch_size=args.max_batch,
                                batch_wait_fraction=args.batch_wait_fraction)
            direct = replica_urls(args.port)
            print(f"query service at {url}/query (health: {url}/healthz); Ctrl-C stops it", flush=True)
            if direct:  # Serve's direct ingress: the same API one hop shorter, per replica
                print(f"replicas answering directly (faster for one-query requests): {', '.join(u + '/query' for u in direct)}", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            stop_service()
            print("query service stopped", flush=True)
        return 0
    from cluster import ray_jobs

    if args.command == "submit":
        cfg = load_config(args.config)
        if args.out:
            cfg.out = args.out
        cfg = absolute_paths(cfg, Path.cwd())  # the job runs in another working directory
        job = ray_jobs.submit_run(config_to_toml(cfg), out=cfg.out, address=args.address, command=args.stage)
        print(f"submitted {job}; run directory {cfg.out}")
        if args.wait:
            ray_jobs.job_logs(args.address, job, follow=True)
            status = ray_jobs.wait_job(args.address, job)
            print(f"{job}: {status}")
            return 0 if status == "SUCCEEDED" else 1
    elif args.command == "status":
        for k, v in ray_jobs.job_status(args.address, args.job).items():
            print(f"{k}: {v}")
    else:
        ray_jobs.job_logs(args.address, args.job, follow=args.follow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
