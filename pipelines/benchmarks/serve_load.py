"""Query service under load, and the batch query job's throughput, on a synthetic-manifold index.

    python -m pipelines.benchmarks.serve_load --n 100000 --seconds 20 --clients 1 2

Builds (once) a run directory from the scale benchmark's descriptors (import + exact reciprocal kNN
graph), starts the Ray Serve query service on loopback (embedded Ray, one replica), and for each
batch size and each way in (`--via`: Serve's proxy, or the replica's own port with direct ingress)
drives `--clients` concurrent clients for `--seconds` while one more client sends a malformed or
oversized request every `--bad-interval` s (each must get a 4xx); the passes over the batch sizes
repeat (`--repeat`) so that memory growth after warm-up shows. Reports queries/s, request latency
percentiles, replica memory before/after and whether the replica process changed (a crash).
Then `--paired-rounds` rounds of the largest batch ranked in-process and sent to the service in
turn (a ratio per pair, robust to the machine's drift). Then runs the batch query job over a
Parquet file of query vectors. Writes JSON + Markdown.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pipelines.logs import setup_logging

log = logging.getLogger("serve_load")


def build_index_run(out: Path, n: int, nq: int, k: int) -> Path:
    """Run directory with descriptors and graph for the synthetic manifold of n points."""
    from pipelines.config import GraphConfig
    from pipelines.graph import run_graph
    from pipelines.import_descriptors import import_descriptors
    from retrieval.synthetic_manifold import ManifoldSpec, make_manifold_dataset

    run = out / f"run-{n}"
    if (run / "graph" / "manifest.json").is_file():
        return run
    out.mkdir(parents=True, exist_ok=True)
    X, _, Q, _ = make_manifold_dataset(ManifoldSpec(n=n, n_queries=nq, shared_dim=32, seed=0))
    np.save(out / f"X-{n}.npy", X)
    np.save(out / f"Q-{n}.npy", Q)
    import_descriptors(run, out / f"X-{n}.npy", queries=out / f"Q-{n}.npy")
    run_graph(run, GraphConfig(k=k, index="flat"))
    return run


def set_query_settings(run: Path, pairs: list[str]) -> dict:
    """The run's [query] section (config.resolved.json) set to `pairs` ("key=value", JSON values;
    a bare word is a string) over the defaults: every phase of this benchmark ranks with them."""
    from pipelines.shards import read_json_or, write_json

    query = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            query[key] = json.loads(value)
        except ValueError:
            query[key] = value
    resolved = read_json_or(run / "config.resolved.json", {})
    write_json({**resolved, "query": query}, run / "config.resolved.json")
    return query


BAD_BODIES = [
    b"{not json",
    json.dumps({"queries": [{"key": "no-such-key"}]}).encode(),
    json.dumps({"queries": [{"vector": [1.0, 2.0]}]}).encode(),
    json.dumps({"queries": [{"key": "x"}] * 5000}).encode(),  # over max_queries
    json.dumps({"queries": [{"image": "AAAA"}]}).encode(),
    json.dumps({"queries": [{"vector": [1.0] * 128}], "topk": 10**6}).encode(),
    b"x" * (2 * 1024 * 1024),  # over the body limit set below
]


def load_phase(url: str, keys: list[str], *, batch: int, clients: int, seconds: float, method: str, topk: int, bad_interval: float,
               seed: int) -> dict:
    from pipelines.client import QueryClient

    lat: list[float] = []
    app: list[float] = []  # the service handler's own time per request (its Server-Timing), ms
    good_q = [0]
    bad = {"sent": 0, "4xx": 0, "other": 0}
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def bad_worker() -> None:
        """Malformed and oversized requests, one every `bad_interval` s, mixed into the load."""
        c = QueryClient(url, timeout=600)
        i = 0
        while time.monotonic() < stop:
            status, _ = c.post_raw(BAD_BODIES[i % len(BAD_BODIES)])
            i += 1
            with lock:
                bad["sent"] += 1
                bad["4xx" if 400 <= status < 500 else "other"] += 1
            time.sleep(bad_interval)
        c.close()

    def worker(w: int) -> None:
        rng = np.random.default_rng(seed * 1000 + w)
        c = QueryClient(url, timeout=600)
        while time.monotonic() < stop:
            qk = [keys[j] for j in rng.integers(0, len(keys), batch)]
            t0 = time.perf_counter()
            try:
                res = c.query(keys=qk, method=method, topk=topk)
            except Exception as e:  # counted and reported, never hidden
                with lock:
                    errors.append(repr(e)[:200])
                continue
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                if c.server_ms is not None:
                    app.append(c.server_ms)
                good_q[0] += len(res["results"])
        c.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    if bad_interval > 0:
        threads.append(threading.Thread(target=bad_worker))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0  # includes the requests in flight at the deadline
    a = np.array(lat) * 1000 if lat else np.zeros(1)
    return {"batch": batch, "clients": clients, "seconds": round(wall, 2), "requests": len(lat), "queries": good_q[0],
            "queries_per_s": round(good_q[0] / wall, 1), "latency_ms_p50": round(float(np.percentile(a, 50)), 1),
            "latency_ms_p95": round(float(np.percentile(a, 95)), 1), "latency_ms_p99": round(float(np.percentile(a, 99)), 1),
            "handler_ms_p50": round(float(np.percentile(app, 50)), 2) if app else None,
            "bad_sent": bad["sent"], "bad_4xx": bad["4xx"], "bad_other": bad["other"], "errors": errors[:5], "n_errors": len(errors)}


def batch_job(run: Path, out: Path, n: int, nq: int, methods: list[str], chunk: int, topk: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.batch_query import run_batch_query
    from pipelines.service import QueryIndex

    Q = np.load(out / f"Q-{n}.npy")
    reps = int(np.ceil(nq / len(Q)))
    Qb = np.tile(Q, (reps, 1))[:nq]
    qfile = out / f"batch-queries-{n}-{nq}.parquet"
    if not qfile.is_file():
        pq.write_table(pa.table({"key": [f"q{i:07d}" for i in range(nq)], "vector": list(Qb)}), qfile)
    index = QueryIndex(run)
    bdir = out / f"batch-{n}-{nq}-{time.strftime('%H%M%S')}"
    return run_batch_query(index, qfile, bdir, methods=methods, topk=topk, chunk=chunk)


def paired_rounds(index, url: str, keys: list[str], *, method: str, batch: int, topk: int, rounds: int, seed: int) -> dict:
    """The same `batch` queries ranked in this process (`QueryIndex.rank`) and sent to the service as
    one request (one client, the service otherwise idle), alternately, `rounds` times (the side that
    goes first alternates too). The machine's drift, which moves a figure measured minutes apart by
    10-20% here, cancels in each pair's ratio: in-process time / request time is the service's
    share of in-process throughput for that pair."""
    from pipelines.client import QueryClient

    rng = np.random.default_rng(seed)
    t_in, t_http = [], []
    with QueryClient(url, timeout=600) as c:
        for r in range(rounds):
            rows = rng.integers(0, len(keys), batch)
            Q, names = index.X[rows], [keys[j] for j in rows]
            for side in ((0, 1) if r % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                if side == 0:
                    index.rank(Q, method, topk)
                else:
                    c.query(keys=names, method=method, topk=topk)
                (t_in if side == 0 else t_http).append(time.perf_counter() - t0)
    ratio = np.array(t_in) / np.array(t_http)
    return {"method": method, "batch": batch, "rounds": rounds, "in_process_ms_p50": round(1000 * float(np.median(t_in)), 1),
            "service_ms_p50": round(1000 * float(np.median(t_http)), 1), "ratio_p50": round(float(np.median(ratio)), 3),
            "ratio_min": round(float(ratio.min()), 3), "ratio_max": round(float(ratio.max()), 3)}


def in_process_reference(index, methods: list[str], batch: int, topk: int, singles: int = 30, batches: int = 3,
                         widths: tuple[int, ...] = ()) -> dict:
    """`QueryIndex.rank` itself (no HTTP, no Ray), per method: queries/s on a batch of `batch`
    queries (median of `batches` runs), the median time of `singles` one-query calls (what a
    request of one query costs), and per width w in `widths` the median time of ranking w queries at
    once (what w one-query requests cost when the service batches them into one solve)."""
    rng = np.random.default_rng(7)
    Q = index.X[rng.integers(0, index.X.shape[0], batch)]
    out = {}
    for m in methods:
        index.rank(Q[:4], m, topk)  # warm-up
        times = []
        for _ in range(batches):
            t0 = time.perf_counter()
            index.rank(Q, m, topk)
            times.append(time.perf_counter() - t0)
        qps = batch / float(np.median(times))
        single = []
        for q in index.X[rng.integers(0, index.X.shape[0], singles)]:
            t0 = time.perf_counter()
            index.rank(q[None], m, topk)
            single.append(time.perf_counter() - t0)
        out[m] = {"batch_queries_per_s": round(qps, 1), "single_ms_p50": round(1000 * float(np.median(single)), 2), "width_ms_p50": {}}
        for w in widths:
            t = []
            for _ in range(max(3, singles // (2 * w))):
                Qw = index.X[rng.integers(0, index.X.shape[0], w)]
                t0 = time.perf_counter()
                index.rank(Qw, m, topk)
                t.append(time.perf_counter() - t0)
            out[m]["width_ms_p50"][w] = round(1000 * float(np.median(t)), 2)
        log.info("in-process %s: %.1f queries/s on a batch of %d (median of %d); one query %.2f ms (median of %d); "
                 "w queries at once, ms: %s", m, qps, batch, batches, out[m]["single_ms_p50"], singles, out[m]["width_ms_p50"])
    return out


def markdown(res: dict) -> str:
    rows = [f"Time to the first answer after `start_service` (replica start, index load, rankers built): "
            f"{res['first_answer_s']:.1f} s (deployed after {res['deploy_s']:.1f} s).", "",
            "| pass | via | method | batch | clients | queries/s | p50 ms | p95 ms | p99 ms | handler p50 ms | vs in-process | bad requests -> 4xx | errors | replica RSS before -> after (MiB) | replica restarted |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    inproc = res["in_process"]
    for p in res["phases"]:
        ref = inproc.get(p["method"], {})
        if p["batch"] == 1 and ref.get("single_ms_p50"):
            vs = f"p50 {p['latency_ms_p50'] / ref['single_ms_p50']:.2f}x of one in-process query ({ref['single_ms_p50']} ms)"
        elif ref.get("batch_queries_per_s"):
            vs = f"{p['queries_per_s'] / ref['batch_queries_per_s']:.2f}x of in-process q/s"
        else:
            vs = "-"
        rows.append(f"| {p['rep'] + 1} | {p.get('via', 'proxy')} | {p['method']} | {p['batch']} | {p['clients']} | {p['queries_per_s']} | {p['latency_ms_p50']} | {p['latency_ms_p95']} | "
                    f"{p['latency_ms_p99']} | {p.get('handler_ms_p50') or '-'} | {vs} | {p['bad_4xx']}/{p['bad_sent']} | {p['n_errors']} | "
                    f"{p['rss_before_mib']:.0f} -> {p['rss_after_mib']:.0f} | {p['replica_restarted']} |")
    rows += ["", "| method | in-process queries/s (batch of %d, median of 3, no HTTP) | in-process one query, median ms |" % max(p["batch"] for p in res["phases"]),
             "|---|---|---|"]
    rows += [f"| {m} | {v['batch_queries_per_s']} | {v['single_ms_p50']} |" for m, v in inproc.items()]
    widths = sorted({w for v in inproc.values() for w in v.get("width_ms_p50", {})})
    if widths:
        rows += ["", "| method | " + " | ".join(f"{w} queries at once, ms (x one)" for w in widths) + " |", "|---|" + "---|" * len(widths)]
        rows += [f"| {m} | " + " | ".join(f"{v['width_ms_p50'][w]} ({v['width_ms_p50'][w] / v['single_ms_p50']:.2f}x)" for w in widths) + " |"
                 for m, v in inproc.items() if v.get("width_ms_p50")]
    if res.get("paired"):
        rows += ["", "| paired rounds: via | method | batch | rounds | in-process ms p50 | request ms p50 | in-process / request: p50 (min-max) |",
                 "|---|---|---|---|---|---|---|"]
        rows += [f"| {p['via']} | {p['method']} | {p['batch']} | {p['rounds']} | {p['in_process_ms_p50']} | {p['service_ms_p50']} | "
                 f"{p['ratio_p50']} ({p['ratio_min']}-{p['ratio_max']}) |" for p in res["paired"]]
    if res.get("batch_job"):
        rows += ["", "| batch job method | queries | chunks | queries/s (wall) | rank-only queries/s |", "|---|---|---|---|---|"]
        for m, b in res["batch_job"].items():
            rows.append(f"| {m} | {b['ranked']} | {res['batch_chunk']} | {b['queries_per_s']} | "
                        f"{round(b['ranked'] / b['rank_seconds'], 1) if b['rank_seconds'] else '-'} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("runs/serve_load"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--methods", nargs="+", default=["diffusion"])
    ap.add_argument("--clients", type=int, nargs="+", default=[4], help="concurrent clients (one load phase per value)")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--bad-interval", type=float, default=0.25, help="seconds between malformed requests (0: none)")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the batch sizes (memory must not grow after the first)")
    ap.add_argument("--via", nargs="+", choices=["direct", "proxy"], default=["direct", "proxy"],
                    help="send the load to the replica's own port (Serve's direct ingress) and/or through Serve's proxy")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--batch-wait", type=float, default=0.0, help="serve.batch's fixed wait for more requests (s)")
    ap.add_argument("--batch-wait-fraction", type=float, default=0.02, help="serve.batch's wait, as a fraction of recent batches' ranking time")
    ap.add_argument("--widths", type=int, nargs="*", default=[], help="in-process: also time w queries ranked at once, per w")
    ap.add_argument("--paired-rounds", type=int, default=10,
                    help="after the load phases: rounds of the largest batch ranked in-process and through the service alternately")
    ap.add_argument("--batch-job-queries", type=int, default=2000)
    ap.add_argument("--batch-job-methods", nargs="+", default=["knn", "diffusion"])
    ap.add_argument("--batch-chunk", type=int, default=500)
    ap.add_argument("--query", nargs="+", default=[], metavar="KEY=VALUE",
                    help="[query] settings of the index (JSON values), e.g. seed_search='\"index\"' truncate_hops=10; kept in the run's "
                         "config.resolved.json, which the service and the in-process reference read")
    args = ap.parse_args(argv)
    setup_logging()

    # the in-process reference in the replica's environment (cluster.ray_serve.REPLICA_ENV), set before OpenMP loads with faiss
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from cluster.local_cluster import free_port
    from cluster.ray_runtime import init_ray
    from cluster.ray_serve import REPLICA_ENV, replica_urls, start_service, stop_service

    if os.environ["OMP_WAIT_POLICY"] != REPLICA_ENV["env_vars"]["OMP_WAIT_POLICY"]:
        log.warning("serve_load: OMP_WAIT_POLICY=%s here, the replica runs with %s: in-process figures are not comparable",
                    os.environ["OMP_WAIT_POLICY"], REPLICA_ENV["env_vars"]["OMP_WAIT_POLICY"])
    from pipelines.client import QueryClient
    from pipelines.descriptors import load_descriptors
    from pipelines.service import QueryIndex, ServiceLimits

    run = build_index_run(args.out, args.n, 1000, args.k)
    settings = set_query_settings(run, args.query)
    _, keys, _ = load_descriptors(run / "descriptors", dense=False)
    index = QueryIndex(run)
    res_inproc = in_process_reference(index, args.methods, max(args.batches), args.topk, widths=tuple(args.widths))
    init_ray("", num_cpus=2)
    t_start = time.perf_counter()
    port = free_port()
    url = start_service(run, port=port, num_cpus=args.replica_cpus, batch_wait_timeout_s=args.batch_wait,
                        batch_wait_fraction=args.batch_wait_fraction,
                        limits=ServiceLimits(max_queries=1024, max_topk=1000, max_request_bytes=1024 * 1024))
    t_deployed = time.perf_counter() - t_start
    urls = {"proxy": url}
    direct = replica_urls(port)
    if direct:
        urls["direct"] = direct[0]
    missing = [v for v in args.via if v not in urls]
    if missing:
        log.warning("serve_load: no replica answers directly (Serve without direct ingress): %s left out", missing)
    res = {"n": args.n, "k": args.k, "query": settings, "urls": urls, "batch_wait_s": args.batch_wait,
           "batch_wait_fraction": args.batch_wait_fraction, "phases": [], "in_process": res_inproc, "deploy_s": t_deployed}
    try:
        with QueryClient(url) as c:
            c.query(keys=keys[:1], method=args.methods[0], topk=args.topk)
            res["first_answer_s"] = time.perf_counter() - t_start
            log.info("first answer %.1f s after start_service (deployed after %.1f s)", res["first_answer_s"], t_deployed)
            for rep in range(args.repeat):
                for method in args.methods:
                    for b, clients, via in itertools.product(args.batches, args.clients, [v for v in args.via if v in urls]):
                        h0 = c.health()
                        p = load_phase(urls[via], keys, batch=b, clients=clients, seconds=args.seconds, method=method, topk=args.topk,
                                       bad_interval=args.bad_interval, seed=b + 100 * rep + 10 * clients)
                        h1 = c.health()
                        p.update(method=method, rep=rep, via=via, rss_before_mib=h0["rss_bytes"] / 2**20,
                                 rss_after_mib=h1["rss_bytes"] / 2**20, replica_restarted=h0["pid"] != h1["pid"])
                        log.info("%s", p)
                        res["phases"].append(p)
            res["paired"] = []
            for method, via in itertools.product(args.methods if args.paired_rounds else [], [v for v in args.via if v in urls]):
                pr = paired_rounds(index, urls[via], keys, method=method, batch=max(args.batches), topk=args.topk,
                                   rounds=args.paired_rounds, seed=11)
                pr["via"] = via
                log.info("paired: %s", pr)
                res["paired"].append(pr)
    finally:
        stop_service()
    if args.batch_job_queries:
        res["batch_chunk"] = args.batch_chunk
        res["batch_job"] = batch_job(run, args.out, args.n, args.batch_job_queries, args.batch_job_methods, args.batch_chunk, args.topk)
    (args.out / f"serve_load-{args.n}.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (args.out / f"serve_load-{args.n}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
