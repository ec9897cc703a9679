"""Ray Serve wiring for the query service: one deployment, replicas holding a loaded `QueryIndex`.

HTTP API (JSON only; request data is never unpickled):
    POST /query    body as in `pipelines.service`, Content-Type application/json
                   -> 200 {"method", "topk", "results": [...]}
                   4xx {"error": "..."} for malformed or oversized requests (415 without the JSON
                   content type, 405 for another method, 408 for a body not whole within
                   body_timeout_s, 429 past the per-client cap of slow uploads); 503 past the
                   overall cap of slow uploads (both with Retry-After)
    GET  /healthz  -> {"status": "ok", "n": database size, "dim", "pid", "rss_bytes"}

`handle_request` is the whole HTTP handling, a plain coroutine (tested without Ray Serve); the
deployment only holds the index and batches the ranking.

Concurrent requests are batched by `serve.batch` and ranked together (one solve per method and
top-k). A batch waits for more requests `batch_wait_timeout_s` (0 by default) plus a fraction
(`batch_wait_fraction`, 2%) of what recent batches took to rank (`BatchWait`): after a truncated
query (a few ms) a batch waits a few hundredths of a millisecond, after an exact solve (a quarter of
a second at 10^5) about 5 ms, so that concurrent clients' next requests share one solve (two queries
in one block cost 1.2x one) instead of queueing behind each other's (BENCHMARKS.md). A request
alone in the replica whose ranking is cheap (`RankCosts`: under 2 ms as measured for its method)
skips the batch and ranks at once on the event loop. The HTTP proxy binds to 127.0.0.1 unless
another host is asked for.

With Serve's direct ingress (on in the Ray this project starts, `cluster.ray_runtime.serve_node_env`)
each replica also answers the same API on a port of its own, on the same host: `replica_urls` lists
them. A request sent there skips the proxy's hop (p50 of a one-query request about half, BENCHMARKS.md).
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
from ray import serve
from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse as _StarletteJSON

from cluster.errors import ClusterError
from pipelines.service import QueryIndex, RequestError, ServiceLimits, decode_request
from retrieval.knn import search_threads, set_search_threads

log = logging.getLogger(__name__)
APP_NAME = "retrieval"


# Solver threads (serve.batch hands each batch to a worker thread) would otherwise each grow their
# own malloc arena, and the replica's memory would creep up with every new thread. faiss's OpenMP
# threads (the seed search) would otherwise keep spinning after each search and take the cores from
# the solver threads that follow it: two truncated queries ranked at once cost 2x one query instead
# of 1.2x, two exact ones 1.3x instead of 1.05x (BENCHMARKS.md); they sleep when idle instead. The
# handler runs on the replica's own event loop, not on a second loop in a thread of its own (Ray
# Serve's default): the hop between the two loops was 0.6 ms of a 1.6 ms one-query request
# (BENCHMARKS.md); whatever is slow in it runs in worker threads (images, costly rankings: `RankCosts`).
REPLICA_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "2", "OMP_WAIT_POLICY": "PASSIVE", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}


class JSONResponse(_StarletteJSON):
    """Starlette's JSON response encoded by orjson: a 256-query answer (0.8 MB) in 2 ms instead of
    20 (BENCHMARKS.md). A NaN or infinity (rankings hold none: queries are checked finite and
    non-zero) would be written as null, not refused."""

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class UploadGuard:
    """Counts the uploads whose body is still arriving after `slow_upload_s`, per client address and
    in all, and refuses one over either cap: 429 past `max_slow_uploads_per_client`, 503 past
    `max_slow_uploads`. One per replica; used from its event loop only."""

    def __init__(self, limits: ServiceLimits):
        self.limits = limits
        self.total = 0
        self.by_client: dict[str, int] = {}

    def enter(self, client: str) -> None:
        lim = self.limits
        if self.by_client.get(client, 0) >= lim.max_slow_uploads_per_client:
            raise RequestError(f"too many slow uploads from {client[:64]} (at most {lim.max_slow_uploads_per_client} "
                               "bodies may trickle in at once): send the body at once or retry later", 429)
        if self.total >= lim.max_slow_uploads:
            raise RequestError(f"the service is receiving {self.total} slow uploads, its limit: retry later", 503)
        self.total += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1

    def leave(self, client: str) -> None:
        self.total -= 1
        n = self.by_client.pop(client) - 1
        if n:
            self.by_client[client] = n


async def read_body(request: Request, limits: ServiceLimits, uploads: UploadGuard | None = None) -> bytes:
    """The request body, refused as soon as it exceeds `max_request_bytes` (413, declared or
    streamed), when it is not whole within `body_timeout_s` (408), or when it is still arriving
    after `slow_upload_s` and `uploads` counts too many such bodies (429/503). The body is read in
    a task so that waiting on it never cancels the read midway."""
    limit = limits.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body of {declared} bytes exceeds the limit of {limit}", 413)
    body = bytearray()

    async def pull() -> None:
        try:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise RequestError(f"request body exceeds the limit of {limit} bytes", 413)
        except (ClientDisconnect, TaskCancelledError):  # the client left mid-body (Serve cancels the receive)
            raise RequestError("the client disconnected before sending the whole body", 400) from None

    task = asyncio.ensure_future(pull())
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # an outcome nobody awaits is not logged
    client = request.client.host if request.client else "unknown"
    counted = False
    try:
        done, _ = await asyncio.wait({task}, timeout=limits.slow_upload_s)
        if not done:
            if uploads is not None:
                uploads.enter(client)
                counted = True
            done, _ = await asyncio.wait({task}, timeout=max(0.0, limits.body_timeout_s - limits.slow_upload_s))
            if not done:
                raise RequestError(f"request body not received within {limits.body_timeout_s:g} s", 408)
        task.result()  # a 413 raised while streaming
        return bytes(body)
    finally:
        if not task.done():
            task.cancel()
        if counted:
            uploads.leave(client)


LIGHT_QUERIES = 8


def light(payload: Any) -> bool:
    """Whether a request is parsed on the event loop: at most LIGHT_QUERIES queries, none an image
    (images are decoded and embedded in a thread). Looking keys up and checking a few vectors
    takes 0.02 ms; handing it to a thread and back took 0.1 ms (BENCHMARKS.md)."""
    queries = payload.get("queries") if isinstance(payload, dict) else None
    return isinstance(queries, list) and len(queries) <= LIGHT_QUERIES and all(isinstance(q, dict) and "image" not in q for q in queries)


class RankCosts:
    """What each method recently cost per query (an exponential average of its batches, weight
    `smoothing` for the newest), to decide where a batch ranks: on the event loop when every
    method of the batch has been seen and its queries are expected to take under `inline_s`
    together, in a worker thread otherwise (the hand-off to a thread and back cost 0.25 ms of a
    0.33 ms precomputed query at 10^5, BENCHMARKS.md; an exact solve still runs in a thread, so
    the loop is never held long)."""

    def __init__(self, inline_s: float = 0.002, smoothing: float = 0.3):
        self.inline_s, self.smoothing = inline_s, smoothing
        self.per_query: dict[str, float] = {}

    def inline(self, methods: list[str], queries: int) -> bool:
        costs = [self.per_query.get(m) for m in set(methods)]
        return all(c is not None for c in costs) and max(costs) * queries < self.inline_s

    def record(self, methods: list[str], queries: int, seconds: float) -> None:
        each = seconds / max(1, queries)
        for m in set(methods):
            old = self.per_query.get(m)
            self.per_query[m] = each if old is None else self.smoothing * each + (1 - self.smoothing) * old


def _is_json(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() == "application/json"


async def handle_request(request: Request, index: Any, rank: Callable[[Any], Awaitable[dict]],
                         uploads: UploadGuard | None = None) -> JSONResponse:
    """One HTTP request to the service: routes, method, content type, body size, upload time and
    JSON checks (each refusal a 4xx, or a 503 when too many slow uploads run, with a message), then
    `index.parse` (in a thread, unless `light`) and `rank(parsed)`. An answer carries the time
    spent here, from the request's arrival in this handler to its encoded answer, as
    `Server-Timing: app;dur=<ms>` (what a client's latency costs besides the HTTP transport)."""
    t0 = time.perf_counter()
    path = request.url.path.rstrip("/") or "/"
    if path == "/healthz":
        if request.method not in ("GET", "HEAD"):
            return _error("use GET /healthz", 405, {"Allow": "GET, HEAD"})
        return JSONResponse({"status": "ok", "n": int(index.X.shape[0]), "dim": index.dim, "pid": os.getpid(),
                             "rss_bytes": _rss_bytes(), "search_threads": search_threads()})
    if path not in ("/", "/query"):
        return _error(f"no such endpoint {path[:200]!r}; use POST /query or GET /healthz", 404)
    if request.method != "POST":
        return _error("use POST with a JSON body", 405, {"Allow": "POST"})
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):
        return _error(f"Content-Type must be application/json, got {(content_type or 'none')[:100]!r}", 415)
    try:
        payload = decode_request(await read_body(request, index.limits, uploads))
        parsed = index.parse(payload) if light(payload) else await asyncio.to_thread(index.parse, payload)
        response = JSONResponse(await rank(parsed))
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.3f}"
        return response
    except RequestError as e:
        return _error(str(e), e.status, {"Retry-After": "1"} if e.status in (429, 503) else None)


def check_port(host: str, port: int) -> None:
    """ClusterError when `port` on `host` cannot be bound on this machine (in use, or not one of its
    addresses). Serve's proxy binds in its own actor and, refused, does not tell the caller: check
    before `start_service` when the proxy will run here (embedded Ray)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror or e})"
            raise ClusterError(f"serve: port {port} on {host} {why}; choose another with --port") from None


def _replica_grpc_on_loopback() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::] (all interfaces)
    whatever the node's address. On a loopback node (the embedded Ray, cluster.local_cluster) bind
    it to 127.0.0.1 like every other listener. Runs in the replica, before Serve starts that server;
    the listening-socket test fails if a Ray upgrade moves the call."""
    import ray
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if ray.util.get_node_ip_address() != "127.0.0.1" or getattr(bind, "loopback", False):
        return

    def bind_loopback(server, address: str):
        return bind(server, address.replace("[::]:", "127.0.0.1:", 1))

    bind_loopback.loopback = True
    replica.add_port_to_grpc_server = bind_loopback


class BatchWait:
    """serve.batch's wait for more requests, adapted to the ranking's cost: `fixed_s` plus `fraction`
    of the recent batches' ranking time (an exponential average, weight `smoothing` for the newest),
    at most `max_s`. The fraction applies after a batch of fewer than `wide` queries only: a
    companion's queries share a narrow solve at little cost (the block product of 2-4 columns costs
    about one column's), while a batch of many queries already runs at its per-query rate and would
    only wait (2% of a 256-query truncated batch: 9 ms; BENCHMARKS.md). `after(seconds, queries)`
    records a batch and returns the next wait."""

    def __init__(self, fixed_s: float = 0.0, fraction: float = 0.02, *, max_s: float = 0.05, smoothing: float = 0.3, wide: int = 32):
        if fixed_s < 0 or fraction < 0 or max_s < 0 or not 0 < smoothing <= 1 or wide < 1:
            raise ValueError("BatchWait: waits and the fraction must be >= 0, smoothing in (0, 1], wide >= 1; got "
                             f"{fixed_s}, {fraction}, {max_s}, {smoothing}, {wide}")
        self.fixed_s, self.fraction, self.max_s, self.smoothing, self.wide = fixed_s, fraction, max_s, smoothing, wide
        self.recent_s: float | None = None
        self.narrow = True

    def after(self, seconds: float, queries: int = 1) -> float:
        self.recent_s = seconds if self.recent_s is None else self.smoothing * seconds + (1 - self.smoothing) * self.recent_s
        self.narrow = queries < self.wide
        return self.wait_s

    @property
    def wait_s(self) -> float:
        return min(self.max_s, self.fixed_s + (self.fraction * (self.recent_s or 0.0) if self.narrow else 0.0))


# Slow uploads hold a slot while their body trickles in, but at most `max_slow_uploads` (32) of
# them for at most `body_timeout_s`: the other slots stay free for queries and health checks.
@serve.deployment(name="QueryService", max_ongoing_requests=128, health_check_period_s=5)
class QueryService:
    """Serve replica: loads the index once; batches concurrent requests into shared solves."""

    def __init__(self, run_dir: str, limits: dict, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.0,
                 batch_wait_fraction: float = 0.02):
        _replica_grpc_on_loopback()
        set_search_threads()  # as many as the solvers' threads, not Ray's OMP_NUM_THREADS=num_cpus
        self.index = QueryIndex(run_dir, limits=ServiceLimits(**limits))
        self.limits = self.index.limits
        self.uploads = UploadGuard(self.limits)
        self.batch_wait = BatchWait(batch_wait_timeout_s, batch_wait_fraction)
        self.costs = RankCosts()
        self.in_flight = 0  # requests inside __call__ (on the user code's event loop: no lock needed)
        self._rank_batch.set_max_batch_size(max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(self.batch_wait.wait_s)

    async def __call__(self, request: Request) -> JSONResponse:
        self.in_flight += 1
        try:
            return await handle_request(request, self.index, self._rank, self.uploads)
        finally:
            self.in_flight -= 1

    async def _rank(self, parsed) -> dict:
        """A cheap request (`RankCosts`) alone in the replica ranks at once, on the event loop: the
        batch's queue and wake-up cost more than its ranking; others join a batch."""
        if self.in_flight == 1 and self.costs.inline([parsed.method], len(parsed.Q)):
            return (await self._rank_now([parsed], inline=True))[0]
        return await self._rank_batch(parsed)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _rank_batch(self, parsed: list) -> list[dict]:
        return await self._rank_now(parsed, inline=self.costs.inline([p.method for p in parsed], sum(len(p.Q) for p in parsed)))

    async def _rank_now(self, parsed: list, *, inline: bool) -> list[dict]:
        """Rank parsed requests together: on the event loop when `inline` (cheap, `RankCosts`), in a
        worker thread otherwise; their cost is recorded for the next decisions and sets the batch's wait."""
        methods, queries = [p.method for p in parsed], sum(len(p.Q) for p in parsed)
        t0 = time.perf_counter()
        if inline:
            out = self.index.rank_many(parsed)
        else:
            out = await asyncio.to_thread(self.index.rank_many, parsed)
        seconds = time.perf_counter() - t0
        self.costs.record(methods, queries, seconds)
        self._rank_batch.set_batch_wait_timeout_s(self.batch_wait.after(seconds, queries))
        return out


def start_service(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, num_cpus: float = 1.0,
                  limits: ServiceLimits | None = None, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.0,
                  batch_wait_fraction: float = 0.02) -> str:
    """Deploy the service on the connected Ray cluster; returns its base URL.

    The proxy binds to `host` (loopback by default); `replicas` replicas of `num_cpus` CPUs each.
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "descriptors").is_dir():
        raise FileNotFoundError(f"serve: {run_dir} has no descriptors/ (run the pipeline first)")
    BatchWait(batch_wait_timeout_s, batch_wait_fraction)  # a bad setting refused here, not in the replica
    serve.start(http_options={"host": host, "port": port})
    app = QueryService.options(num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus, "runtime_env": REPLICA_ENV}).bind(
        str(run_dir), dataclasses.asdict(limits or ServiceLimits()), max_batch_size, batch_wait_timeout_s, batch_wait_fraction)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    log.info("serve: %d replica(s) of the query service for %s at %s", replicas, run_dir, url)
    return url


def replica_urls(proxy_port: int, app: str = APP_NAME, *, timeout_s: float = 30.0) -> list[str]:
    """The base URLs at which the running replicas of `app` answer directly (Serve's direct ingress),
    sorted; [] when the cluster runs Serve without it (its target groups then list only the proxy, on
    `proxy_port`). Waits up to `timeout_s` for every running replica's port. The one place that reads
    Serve's target groups (Ray 2.60: the controller's instance details, `target_groups`)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    deadline = time.monotonic() + timeout_s
    while True:
        details = client.get_serve_details()
        groups = [g for g in details.get("target_groups") or [] if g.get("app_name") == app and g.get("protocol") == "HTTP"]
        urls = sorted({f"http://{t['ip']}:{t['port']}" for g in groups for t in g["targets"] if int(t["port"]) != proxy_port})
        deployments = ((details.get("applications") or {}).get(app) or {}).get("deployments") or {}
        running = sum(str(r.get("state")).endswith("RUNNING") for d in deployments.values() for r in d.get("replicas") or [])
        if not groups or len(urls) >= max(running, 1) or time.monotonic() > deadline:
            return urls  # no group of the app's own: Serve runs without direct ingress
        time.sleep(0.2)


def stop_service() -> None:
    """Shut the service down (nothing to do when Ray never started)."""
    import ray

    if ray.is_initialized():
        serve.shutdown()


def build_app(args: dict):
    """Serve application builder for config files (`serve run` / KubeRay RayService `serveConfigV2`):

        import_path: cluster.ray_serve:build_app
        args: {run_dir: /data/runs/index, max_batch_size: 16, limits: {max_queries: 1024}}
    """
    allowed = {"run_dir", "limits", "max_batch_size", "batch_wait_timeout_s", "batch_wait_fraction"}
    unknown = sorted(set(args) - allowed)
    if unknown or "run_dir" not in args:
        raise ValueError(f"build_app: needs run_dir; known args {sorted(allowed)}, unknown {unknown}")
    limits = dataclasses.asdict(ServiceLimits(**args.get("limits", {})))
    wait = BatchWait(float(args.get("batch_wait_timeout_s", 0.0)), float(args.get("batch_wait_fraction", 0.02)))  # refused here, not in the replica
    return QueryService.bind(str(args["run_dir"]), limits, int(args.get("max_batch_size", 16)), wait.fixed_s, wait.fraction)
