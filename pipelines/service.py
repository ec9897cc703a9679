"""The query service's core, without Ray: a loaded index that answers JSON batches of queries.

A request is JSON (never pickle):

    {"method": "diffusion", "topk": 10,
     "queries": [{"key": "db/img001.jpg"}, {"vector": [0.1, ...]}, {"image": "<base64 bytes>"}]}

`method` is one of SERVICE_METHODS (the ranking methods, "none" an alias of "knn"); each query is a database key, a
descriptor vector (whitened space, as stored in descriptors/) or an encoded image (run through the
run's extractor and whitening). The answer lists, per query, the top-k database keys, ids and
scores, and for diffusion the CG iterations and whether the solve converged (a query whose solve
did not converge is flagged, never silently ranked).

Every ranking goes through the index's `pipelines.rankers.Rankers`, built once per replica: the
same rankers as the query stage and the batch query job. Malformed or oversized requests raise `RequestError` carrying an HTTP status.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import reprlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.rankers import GRAPH_METHODS, METHODS, REGION_METHODS, Ranking

from .config import ExtractConfig, QueryConfig, _build
from .rankers import Rankers
from .shards import read_json

log = logging.getLogger(__name__)

# what a request may name: every ranking method except the MPI solve (one process per request
# would not serve), and "none" as an alias of kNN
# petsc: a batch method (MPI ranks per call); regional: ranks a query's regions, which the service's
# queries (a key or a vector) do not carry: both run in the query stage and the batch query job
SERVICE_METHODS = {"none": "knn", **{m: m for m in METHODS if m != "petsc" and m not in REGION_METHODS}}
# built when the index loads, so that the first request pays for no set-up; so are the run's own
# [query].methods (spectral's eigendecomposition and precomputed's rows are read from their files in
# graph/, or computed there then); others are built on first use
WARM_METHODS = ("knn", "aqe", "diffusion", "truncated")


class RequestError(ValueError):
    """A request the service refuses; `status` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ServiceLimits:
    """Bounds on what one request may ask for."""

    max_queries: int = 1024  # queries per request
    max_topk: int = 1000
    max_request_bytes: int = 32 * 1024 * 1024  # body size
    max_image_bytes: int = 8 * 1024 * 1024  # one encoded image
    max_image_pixels: int = 40_000_000  # decompression-bomb guard (as ingest)
    max_request_pixels: int = 64_000_000  # pixels summed over a request's images: bounds its decode work
    max_decode_seconds: float = 5.0  # decode time per request: no further image is decoded past it (413)
    # slow uploads (HTTP): a body still arriving `slow_upload_s` after the request reached the replica
    # counts against the caps below (429 per client, 503 overall); any body must be whole within
    # `body_timeout_s` (408). A body that arrives promptly is never counted, so stalled clients cannot
    # make valid queries wait.
    body_timeout_s: float = 10.0
    slow_upload_s: float = 0.5
    max_slow_uploads: int = 32
    max_slow_uploads_per_client: int = 8


@dataclass
class ParsedRequest:
    """A validated request: query vectors (nq, d) float32, their names, method and top-k."""

    Q: np.ndarray
    names: list[str]
    method: str
    topk: int


# user values quoted in error messages: bounded in length and depth (a key of megabytes, or a list
# nested a thousand deep, is echoed as a short excerpt, never rebuilt in full)
_show = reprlib.Repr()
_show.maxstring = _show.maxother = 80
_show.maxlevel = 3


def unit_vector(value) -> np.ndarray:
    """A query vector (sequence of numbers) L2-normalised to (d,) float32; ValueError if it is not
    finite, is zero, or its norm is not representable (shared by the service and the batch query job)."""
    try:
        v = np.asarray(value, np.float64)
    except OverflowError:  # an integer beyond float64 (JSON allows any number of digits)
        raise ValueError("must be finite and non-zero (a value is beyond the float64 range)") from None
    if not np.isfinite(v).all() or not v.any():
        raise ValueError("must be finite and non-zero")
    with np.errstate(over="ignore", under="ignore"):
        norm = np.linalg.norm(v)
        u = v / norm if 0 < norm < np.inf else np.zeros_like(v)
    if not np.isfinite(norm):
        raise ValueError(f"is too large to normalise: its norm overflows float64 (largest value {np.abs(v).max():.3g}); rescale it")
    if abs(float(np.linalg.norm(u)) - 1) > 1e-3:  # the squares underflowed: normalising would lose the vector
        raise ValueError(f"is too small to normalise: its norm underflows float64 (largest value {np.abs(v).max():.3g}); rescale it")
    return u.astype(np.float32)


def decode_request(body: bytes) -> Any:
    """A request body (UTF-8 JSON) -> the decoded payload; RequestError (400) for anything that is
    not JSON: bad syntax or encoding, nesting beyond the decoder's depth, an integer of more digits
    than Python converts."""
    try:
        return json.loads(body)
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise RequestError(f"request body is not valid JSON: {str(e)[:200]}") from None


def _section(cls, data: dict | None, where: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    return _build(cls, {k: v for k, v in (data or {}).items() if k in fields}, where)


class QueryIndex:
    """Descriptors, graph, whitening (and, for image queries, the CNN) of a run, loaded once.

    `answer(payload)` validates and ranks one request; `rank_many(requests)` ranks several parsed
    requests together (one solve per method and top-k), which is how the Ray Serve replica batches.
    """

    def __init__(self, run_dir: str | Path, *, limits: ServiceLimits | None = None, query: QueryConfig | None = None,
                 warm: tuple[str, ...] = WARM_METHODS):
        from .descriptors import load_descriptors

        self.run_dir = Path(run_dir)
        self.limits = limits or ServiceLimits()
        resolved = read_json(self.run_dir / "config.resolved.json") if (self.run_dir / "config.resolved.json").is_file() else {}
        self.query_cfg = query or _section(QueryConfig, resolved.get("query"), "query")
        # the extractor for image queries is the one that made the descriptors: their manifest
        # records it (config.resolved.json is rewritten by any later stage command)
        manifest = read_json(self.run_dir / "manifest.json") if (self.run_dir / "manifest.json").is_file() else {}
        made_by = {k: v for k, v in manifest.items() if v is not None}
        self.extract_cfg = _section(ExtractConfig, {**(resolved.get("extract") or {}), **made_by}, "extract")
        self.weights_sha256 = manifest.get("weights_sha256")
        self.ids, self.keys, self.X = load_descriptors(self.run_dir / "descriptors", dense=False)
        self.row_of_key = {k: i for i, k in enumerate(self.keys)}
        self._keys_array = np.array(self.keys, dtype=object)  # rows -> keys for a whole answer at once
        # the run's query set (queries/descriptors) is queryable by key too, after the database's keys
        self.query_vectors: dict[str, np.ndarray] = {}
        if (self.run_dir / "queries" / "descriptors").is_dir():
            _, qkeys, QX = load_descriptors(self.run_dir / "queries" / "descriptors", dense=False)
            if QX.shape[1:] == self.X.shape[1:]:
                self.query_vectors = {k: QX[i] for i, k in enumerate(qkeys) if k not in self.row_of_key}
        self.rankers = Rankers(self.X, self.query_cfg, graph_dir=self.run_dir / "graph")
        self.has_graph = self.rankers.has_graph
        own = [m for m in self.query_cfg.methods if m in SERVICE_METHODS.values() and m not in warm]
        ready = [m for m in (*warm, *own) if m not in GRAPH_METHODS or self.has_graph]
        for m in ready:
            self.rankers.get(m)
        self._lock = threading.Lock()  # the extractor is not re-entrant
        self._extractor = None
        log.info("service: index of %d descriptors (d=%d) from %s, graph %s, rankers ready: %s", self.X.shape[0], self.X.shape[1],
                 self.run_dir, "loaded" if self.has_graph else "absent", ready)

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    # -- parsing -------------------------------------------------------------------------------
    def parse(self, payload: Any) -> ParsedRequest:
        """Validate a decoded JSON payload; raises RequestError (400/413/422) with a clear message."""
        lim = self.limits
        if not isinstance(payload, dict):
            raise RequestError("request body must be a JSON object with a 'queries' list")
        unknown = sorted(set(payload) - {"queries", "method", "topk"})
        if unknown:
            raise RequestError(f"unknown field(s) {_show.repr(unknown)}; expected 'queries', 'method', 'topk'")
        method = payload.get("method", "diffusion")
        if not isinstance(method, str) or method not in SERVICE_METHODS:
            raise RequestError(f"unknown method {_show.repr(method)}; expected one of {sorted(SERVICE_METHODS)}")
        if SERVICE_METHODS[method] in GRAPH_METHODS and not self.has_graph:
            raise RequestError(f"method {method!r} needs the graph, and this index has none (run the graph stage)", 422)
        topk = payload.get("topk", 10)
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise RequestError(f"topk must be a positive integer, got {_show.repr(topk)}")
        if topk > lim.max_topk:
            raise RequestError(f"topk {topk} exceeds the limit {lim.max_topk}", 413)
        queries = payload.get("queries")
        if not isinstance(queries, list) or not queries:
            raise RequestError("'queries' must be a non-empty list of {'key'|'vector'|'image': ...} objects")
        if len(queries) > lim.max_queries:
            raise RequestError(f"{len(queries)} queries exceed the limit of {lim.max_queries} per request", 413)
        Q = np.empty((len(queries), self.dim), np.float32)
        names, images, image_rows = [], [], []
        pixels = 0
        for i, q in enumerate(queries):
            if not isinstance(q, dict) or len(q) != 1 or next(iter(q)) not in ("key", "vector", "image"):
                raise RequestError(f"queries[{i}] must be an object with exactly one of 'key', 'vector', 'image'")
            kind, value = next(iter(q.items()))
            if kind == "key":
                if isinstance(value, str) and value in self.row_of_key:
                    Q[i] = self.X[self.row_of_key[value]]
                elif isinstance(value, str) and value in self.query_vectors:
                    Q[i] = self.query_vectors[value]
                else:
                    raise RequestError(f"queries[{i}]: unknown key {_show.repr(value)} (neither a database image nor one of the "
                                       "run's queries)", 404 if isinstance(value, str) else 400)
                names.append(value)
            elif kind == "vector":
                Q[i] = self._vector(value, i)
                names.append(f"vector:{i}")
            else:
                data, (w, h) = self._image_bytes(value, i)
                pixels += w * h
                if pixels > lim.max_request_pixels:  # from the headers, before any pixel is decoded
                    raise RequestError(f"the images of this request declare over {lim.max_request_pixels} pixels in all "
                                       f"(queries[{i}] is {w}x{h}): send fewer or smaller images per request", 413)
                images.append(data)
                image_rows.append(i)
                names.append(f"image:{i}")
        if images:
            self._decode_check(images, image_rows)
            Q[image_rows] = self.embed_images(images)
        return ParsedRequest(Q=Q, names=names, method=method, topk=min(topk, self.X.shape[0]))

    def _vector(self, value: Any, i: int) -> np.ndarray:
        if not isinstance(value, list) or len(value) != self.dim:
            n = len(value) if isinstance(value, list) else type(value).__name__
            raise RequestError(f"queries[{i}].vector must be a list of {self.dim} numbers, got {n}", 422)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise RequestError(f"queries[{i}].vector must hold numbers only")
        try:
            return unit_vector(value)
        except ValueError as e:
            raise RequestError(f"queries[{i}].vector {e}", 422) from None

    def _image_bytes(self, value: Any, i: int) -> tuple[bytes, tuple[int, int]]:
        """queries[i].image -> (encoded bytes, declared (width, height)); nothing decoded yet."""
        if not isinstance(value, str):
            raise RequestError(f"queries[{i}].image must be a base64 string")
        if len(value) > self.limits.max_image_bytes * 4 // 3 + 4:
            raise RequestError(f"queries[{i}].image exceeds {self.limits.max_image_bytes} bytes", 413)
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"queries[{i}].image is not valid base64") from None
        from .ingest import image_header

        try:
            size = image_header(data)
        except ValueError as e:
            raise RequestError(f"queries[{i}].image: {e}", 422) from None
        return data, size

    def _decode_check(self, images: list[bytes], rows: list[int]) -> None:
        """Decode each image fully (truncated files, bombs, sizes), once the request's total is known;
        no image is decoded once the request has spent `max_decode_seconds` decoding (413)."""
        from .ingest import validate_image

        budget = self.limits.max_decode_seconds
        t0 = time.monotonic()
        for j, (data, i) in enumerate(zip(images, rows)):
            if j and time.monotonic() - t0 > budget:
                raise RequestError(f"decoding this request's images took over {budget:g} s (stopped before queries[{i}]): "
                                   "send fewer or smaller images per request", 413)
            try:
                validate_image(data, max_pixels=self.limits.max_image_pixels)
            except ValueError as e:
                raise RequestError(f"queries[{i}].image: {e}", 422) from None

    def embed_images(self, images: list[bytes]) -> np.ndarray:
        """Encoded images -> (n, d) float32 descriptors in the database's (whitened) space."""
        if self.extract_cfg.region_whitening:
            raise RequestError("image queries are not supported for runs with region_whitening", 422)
        with self._lock:
            if self._extractor is None:
                from .extract import load_whitening
                from .extractor import DescriptorExtractor

                self._extractor = DescriptorExtractor(self.extract_cfg)
                if self.weights_sha256 and self._extractor.info.get("weights_sha256") not in (None, self.weights_sha256):
                    self._extractor = None
                    raise RequestError("the network weights on this machine differ from those that made the index's "
                                       "descriptors (manifest weights_sha256): image queries refused", 422)
                wpath = self.run_dir / "whitening.npz"
                self._whitening = load_whitening(wpath) if (self.extract_cfg.whitening != "none" and wpath.is_file()) else None
            F = self._extractor(images)
        from retrieval.whitening import l2_normalize

        X = self._whitening.apply(F) if self._whitening is not None else l2_normalize(F)
        if X.shape[1] != self.dim:
            raise RequestError(f"the run's extractor gives {X.shape[1]}-d vectors but the index holds {self.dim}-d ones", 422)
        return X.astype(np.float32)

    # -- ranking -------------------------------------------------------------------------------
    def rank(self, Q: np.ndarray, method: str, topk: int) -> Ranking:
        """Q (nq, d) float32 -> Ranking of database rows (nq, topk) with, for the CG solvers, their
        per-query stats, from the index's rankers (the query stage's code path)."""
        name = SERVICE_METHODS.get(method) if isinstance(method, str) else None
        if name is None:
            raise RequestError(f"unknown method {_show.repr(method)}; expected one of {sorted(SERVICE_METHODS)}")
        return self.rankers.rank(name, Q, topk)

    def rank_many(self, requests: list[ParsedRequest]) -> list[dict]:
        """Rank several parsed requests; requests with the same method and top-k share one solve."""
        out: list[dict | None] = [None] * len(requests)
        groups: dict[tuple[str, int], list[int]] = {}
        for j, r in enumerate(requests):
            groups.setdefault((r.method, r.topk), []).append(j)
        for (method, topk), members in groups.items():
            res = self.rank(np.concatenate([requests[j].Q for j in members]), method, topk)
            row = 0
            for j in members:
                nq = requests[j].Q.shape[0]
                out[j] = self._response(requests[j], res, row, row + nq)
                row += nq
        return out  # type: ignore[return-value]

    def _response(self, req: ParsedRequest, res: Ranking, r0: int, r1: int) -> dict:
        """The answer to one request: rows r0:r1 of a shared ranking, each array converted to lists once
        for all its queries (per-query conversions took 12 ms of a 256-query answer; BENCHMARKS.md)."""
        rows = res.ids[r0:r1]
        ids = self.ids[rows].tolist()
        keys = self._keys_array[rows].tolist()
        scores = np.asarray(res.scores[r0:r1], np.float64).round(6).tolist()
        results = [{"query": name, "ids": i, "keys": k, "scores": s} for name, i, k, s in zip(req.names, ids, keys, scores)]
        if res.stats is not None:
            for item, it, ok in zip(results, res.stats.iterations[r0:r1].tolist(), res.stats.converged[r0:r1].tolist()):
                item.update(iterations=int(it), converged=bool(ok))
        return {"method": req.method, "topk": req.topk, "results": results}

    def answer(self, payload: Any) -> dict:
        """Validate and rank one request (the service without Ray)."""
        return self.rank_many([self.parse(payload)])[0]
