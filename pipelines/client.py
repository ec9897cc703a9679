"""A small Python client for the query service (standard library, one kept-alive connection; answers
are decoded with orjson when it is installed, as it is with this package: a 256-query answer of top-100
lists in 4 ms instead of the standard library's 10.5, BENCHMARKS.md).

    from pipelines.client import QueryClient
    c = QueryClient("http://127.0.0.1:8000")
    c.query(keys=["db/img001.jpg"], method="diffusion", topk=10)["results"][0]["keys"]
"""
from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np

try:
    from orjson import loads as _loads  # raises orjson.JSONDecodeError, a json.JSONDecodeError
except ImportError:  # the client alone, copied without this package's dependencies
    _loads = json.loads


def _app_ms(header: str | None) -> float | None:
    """The `app` entry's duration (ms) of a Server-Timing header, e.g. "app;dur=0.412"; None without one."""
    for entry in (header or "").split(","):
        name, _, params = entry.strip().partition(";")
        if name == "app":
            for p in params.split(";"):
                key, _, value = p.strip().partition("=")
                if key == "dur":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


class ServiceError(RuntimeError):
    """The service answered with an error status (4xx: the request was refused; 5xx: it failed)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class QueryClient:
    """Not thread-safe: give each thread its own client."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float = 120.0):
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"client: expected an http://host:port URL, got {url!r}")
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self._conn: http.client.HTTPConnection | None = None
        self.server_ms: float | None = None  # the last answer's time inside the service's handler (its Server-Timing)

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        for attempt in (0, 1):  # one retry when a kept-alive connection was closed by the server
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
                resp = self._conn.getresponse()
                raw = resp.read()
                self.server_ms = _app_ms(resp.getheader("Server-Timing"))
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
            except Exception:  # refused, timed out, ...: the connection is unusable; the next call opens a new one
                self.close()
                raise
        try:
            data = _loads(raw) if raw else {}
        except json.JSONDecodeError:
            data = {"error": raw[:500].decode("utf-8", "replace")}
        return resp.status, data

    def post_raw(self, body: bytes, path: str = "/query") -> tuple[int, dict]:
        """POST an arbitrary body; returns (status, decoded JSON). For tests and load generation."""
        return self._request("POST", path, body)

    def health(self) -> dict:
        status, data = self._request("GET", "/healthz")
        if status != 200:
            raise ServiceError(status, data.get("error", str(data)))
        return data

    def query(self, *, keys: Sequence[str] = (), vectors: np.ndarray | Sequence[Sequence[float]] | None = None,
              images: Sequence[bytes | str | Path] = (), method: str = "diffusion", topk: int = 10) -> dict:
        """Rank a batch of queries given as database keys, descriptor vectors (n, d) or images
        (encoded bytes or file paths). Returns the service's JSON answer; raises ServiceError."""
        queries: list[dict[str, Any]] = [{"key": k} for k in keys]
        if vectors is not None:
            queries += [{"vector": [float(x) for x in v]} for v in np.asarray(vectors, np.float64)]
        for im in images:
            data = Path(im).read_bytes() if isinstance(im, (str, Path)) else im
            queries.append({"image": base64.b64encode(data).decode("ascii")})
        status, data = self._request("POST", "/query", json.dumps({"queries": queries, "method": method, "topk": topk}).encode())
        if status != 200:
            raise ServiceError(status, data.get("error", str(data)))
        return data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "QueryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
