"""Ray Serve wiring for the query service: one deployment, replicas holding a loaded `QueryIndex`.

HTTP API (JSON only; request data is never unpickled):
    POST /query    body as in `pipelines.service` -> 200 {"method", "topk", "results": [...]}
                   4xx {"error": "..."} for malformed or oversized requests
    GET  /healthz  -> {"status": "ok", "n": database size, "dim", "pid", "rss_bytes"}

Concurrent requests are batched by `serve.batch` and ranked together (one solve per method and
top-k). The HTTP proxy binds to 127.0.0.1 unless another host is asked for.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipelines.service import QueryIndex, RequestError, ServiceLimits

log = logging.getLogger(__name__)
APP_NAME = "retrieval"


# Solver threads (serve.batch hands each batch to a worker thread) would otherwise each grow their
# own malloc arena, and the replica's memory would creep up with every new thread.
REPLICA_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "2"}}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(name="QueryService", max_ongoing_requests=64, health_check_period_s=5)
class QueryService:
    """Serve replica: loads the index once; batches concurrent requests into shared solves."""

    def __init__(self, run_dir: str, limits: dict, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005):
        self.index = QueryIndex(run_dir, limits=ServiceLimits(**limits))
        self.limits = self.index.limits
        self._rank_batch.set_max_batch_size(max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"request body of {declared} bytes exceeds the limit of {limit}", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(f"request body exceeds the limit of {limit} bytes", 413)
        return bytes(body)

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        if path == "/healthz" and request.method == "GET":
            return JSONResponse({"status": "ok", "n": int(self.index.X.shape[0]), "dim": self.index.dim, "pid": os.getpid(),
                                 "rss_bytes": _rss_bytes()})
        if path not in ("/", "/query"):
            return _error(f"no such endpoint {path!r}; use POST /query or GET /healthz", 404)
        if request.method != "POST":
            return _error("use POST with a JSON body", 405)
        try:
            body = await self._read_body(request)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"request body is not valid JSON: {e}") from None
            parsed = await asyncio.to_thread(self.index.parse, payload)
            return JSONResponse(await self._rank_batch(parsed))
        except RequestError as e:
            return _error(str(e), e.status)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _rank_batch(self, parsed: list) -> list[dict]:
        return await asyncio.to_thread(self.index.rank_many, parsed)


def start_service(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, num_cpus: float = 1.0,
                  limits: ServiceLimits | None = None, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005) -> str:
    """Deploy the service on the connected Ray cluster; returns its base URL.

    The proxy binds to `host` (loopback by default); `replicas` replicas of `num_cpus` CPUs each.
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "descriptors").is_dir():
        raise FileNotFoundError(f"serve: {run_dir} has no descriptors/ (run the pipeline first)")
    serve.start(http_options={"host": host, "port": port})
    app = QueryService.options(num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus, "runtime_env": REPLICA_ENV}).bind(
        str(run_dir), dataclasses.asdict(limits or ServiceLimits()), max_batch_size, batch_wait_timeout_s)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    log.info("serve: %d replica(s) of the query service for %s at %s", replicas, run_dir, url)
    return url


def stop_service() -> None:
    serve.shutdown()


def build_app(args: dict):
    """Serve application builder for config files (`serve run` / KubeRay RayService `serveConfigV2`):

        import_path: cluster.ray_serve:build_app
        args: {run_dir: /data/runs/index, max_batch_size: 16, limits: {max_queries: 1024}}
    """
    allowed = {"run_dir", "limits", "max_batch_size", "batch_wait_timeout_s"}
    unknown = sorted(set(args) - allowed)
    if unknown or "run_dir" not in args:
        raise ValueError(f"build_app: needs run_dir; known args {sorted(allowed)}, unknown {unknown}")
    limits = dataclasses.asdict(ServiceLimits(**args.get("limits", {})))
    return QueryService.bind(str(args["run_dir"]), limits, int(args.get("max_batch_size", 16)),
                             float(args.get("batch_wait_timeout_s", 0.005)))
