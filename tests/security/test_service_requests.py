"""Query service hardening: every malformed request gets a 4xx with a message, at the HTTP level
(`cluster.ray_serve.handle_request`, driven without Ray Serve) and in the core (`unit_vector`,
`decode_request`)."""
from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest

from pipelines.service import RequestError, ServiceLimits, decode_request, unit_vector

ray_serve = pytest.importorskip("cluster.ray_serve")


class FakeIndex:
    """What handle_request needs of a QueryIndex; parse hands the payload through."""

    def __init__(self, max_request_bytes: int = 10_000_000):
        self.limits = ServiceLimits(max_request_bytes=max_request_bytes)
        self.X = np.zeros((3, 4), np.float32)
        self.dim = 4
        self.parsed: list = []

    def parse(self, payload):
        self.parsed.append(payload)
        return payload


def call(index, method: str, path: str, body: bytes = b"", content_type: str | None = "application/json", rank=None):
    """One request through handle_request -> (status, decoded JSON body, headers); `rank` answers
    a parsed request (default: echoes it)."""
    from starlette.requests import Request

    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "headers": headers, "query_string": b"",
             "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000), "http_version": "1.1"}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def echo(parsed):
        return {"ranked": parsed}

    async def go():
        return await ray_serve.handle_request(Request(scope, receive), index, rank or echo)

    resp = asyncio.run(go())
    return resp.status_code, json.loads(resp.body), resp.headers


OK_BODY = json.dumps({"queries": [{"key": "a"}]}).encode()


def test_a_well_formed_request_reaches_the_index():
    idx = FakeIndex()
    status, data, _ = call(idx, "POST", "/query", OK_BODY)
    assert status == 200 and data == {"ranked": {"queries": [{"key": "a"}]}} and len(idx.parsed) == 1


def test_an_answer_carries_the_handlers_time_and_the_client_reads_it():
    """Server-Timing `app;dur=<ms>`: the time from the request's arrival in the handler to its
    encoded answer, the ranking included (here a ranking that sleeps 30 ms); the client's parser
    takes the app entry among others and None without one."""
    from pipelines.client import _app_ms

    async def slow(parsed):
        await asyncio.sleep(0.03)
        return {"ranked": parsed}

    status, _, headers = call(FakeIndex(), "POST", "/query", OK_BODY, rank=slow)
    ms = _app_ms(headers["server-timing"])
    assert status == 200 and 30 <= ms < 5000
    assert _app_ms("db;dur=3, app;desc=x;dur=1.25") == 1.25 and _app_ms(None) is None and _app_ms("app;dur=oops") is None
    assert _app_ms("total;dur=4") is None


@pytest.mark.parametrize("content_type,status", [
    (None, 415), ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("application/jsonp", 415),
    ("multipart/form-data; boundary=x", 415), ("application/json", 200), ("application/json; charset=utf-8", 200),
    ("Application/JSON", 200),
])
def test_only_json_bodies_are_accepted(content_type, status):
    idx = FakeIndex()
    got, data, _ = call(idx, "POST", "/query", OK_BODY, content_type=content_type)
    assert got == status
    if status == 415:
        assert "application/json" in data["error"] and not idx.parsed  # refused before the body is read


@pytest.mark.parametrize("method,path,status,allow", [
    ("POST", "/healthz", 405, "GET, HEAD"), ("PUT", "/healthz", 405, "GET, HEAD"), ("GET", "/query", 405, "POST"),
    ("DELETE", "/query", 405, "POST"), ("POST", "/elsewhere", 404, None), ("GET", "/healthz", 200, None),
])
def test_routes_and_methods(method, path, status, allow):
    got, data, headers = call(FakeIndex(), method, path, OK_BODY if method == "POST" else b"")
    assert got == status
    if status != 200:
        assert data["error"]
    if allow:
        assert headers["allow"] == allow
    if status == 200:
        assert data["status"] == "ok" and data["n"] == 3


@pytest.mark.parametrize("body,status,msg", [
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"queries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
    (b'{"queries": [{"vector": [' + b"9" * 5000 + b"]}]}", 400, "not valid JSON"),  # beyond Python's int digit limit
    (b"\xff\xfe\xfa\x00garbage", 400, "not valid JSON"),
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
])
def test_bodies_that_are_not_json_get_400(body, status, msg):
    got, data, _ = call(FakeIndex(), "POST", "/query", body)
    assert got == status and msg in data["error"]
    assert len(data["error"]) < 400  # one short message, not the body echoed back


def test_oversized_body_gets_413():
    got, data, _ = call(FakeIndex(max_request_bytes=1000), "POST", "/query", b" " * 2000)
    assert got == 413 and "exceeds" in data["error"]


def test_decode_request_refuses_with_request_errors():
    assert decode_request(b'{"a": [1, 2]}') == {"a": [1, 2]}
    for body in (b"[" * 100_000, b"[" * 50_000 + b"]" * 50_000, b"1" * 5000, b"\xff"):
        with pytest.raises(RequestError) as e:
            decode_request(body)
        assert e.value.status == 400


def test_unit_vector_refuses_what_it_cannot_normalise():
    np.testing.assert_allclose(unit_vector([1e150] * 4), [0.5] * 4, rtol=1e-6)  # large, but its norm is computable
    np.testing.assert_allclose(unit_vector([3, 4]), [0.6, 0.8], rtol=1e-6)
    for bad, msg in [([1e308] * 4, "overflows"), ([1e308, 0.0], "overflows"), ([10**400, 1.0], "float64 range"), ([0.0, 0.0], "non-zero"),
                     ([float("nan"), 1.0], "finite"), ([1e-200, 0.0], "underflows"), ([1.5e-162, 0.0], "underflows")]:
        with pytest.raises(ValueError, match=msg):
            unit_vector(bad)


@pytest.fixture
def imported_index(tmp_path):
    """A QueryIndex over imported descriptors (no graph, no CNN)."""
    from pipelines.import_descriptors import import_descriptors
    from pipelines.service import QueryIndex

    X = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    np.save(tmp_path / "db.npy", X)
    import_descriptors(tmp_path / "run", tmp_path / "db.npy")
    return QueryIndex(tmp_path / "run", warm=("knn",))


@pytest.mark.parametrize("payload,status,msg", [
    ({"queries": [{"vector": [1.0] * 8}], "method": ["knn"]}, 400, "unknown method"),
    ({"queries": [{"vector": [10**400] + [1.0] * 7}], "method": "knn"}, 422, "float64 range"),
    ({"queries": [{"vector": [1e308] * 8}], "method": "knn"}, 422, "overflows"),
    ({"queries": [{"key": [[[["x"]]]]}], "method": "knn"}, 400, "unknown key"),
    ({"queries": [{"vector": [1.0] * 8}], "method": "diffusion"}, 422, "needs the graph"),
])
def test_malformed_values_get_4xx_over_http(imported_index, payload, status, msg):
    async def rank(parsed):
        return imported_index.rank_many([parsed])[0]

    idx = imported_index
    got, data, _ = call(idx, "POST", "/query", json.dumps(payload).encode(), rank=rank)
    assert got == status and msg in data["error"], data
    body = json.dumps({"queries": [{"key": idx.keys[2]}], "method": "knn", "topk": 1}).encode()
    ok, data, _ = call(idx, "POST", "/query", body, rank=rank)
    assert ok == 200 and data["results"][0]["keys"] == [idx.keys[2]]


def test_port_in_use_is_a_cluster_error():
    from cluster.errors import ClusterError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {port} on 127.0.0.1 is already in use"):
            ray_serve.check_port("127.0.0.1", port)
    ray_serve.check_port("127.0.0.1", port)  # free again


def test_decode_work_per_request_is_bounded_before_any_decode(tiny_run, monkeypatch):
    """Images that each pass the per-image limit but together declare more pixels than the request
    budget are refused (413) from their headers: no pixel is decoded (issue 11, item 8)."""
    import base64
    import io

    from PIL import Image

    import pipelines.ingest
    from pipelines.service import QueryIndex

    buf = io.BytesIO()
    Image.new("RGB", (2000, 1500)).save(buf, format="PNG")  # a few KB that declare 3 Mpixel
    img = base64.b64encode(buf.getvalue()).decode()
    index = QueryIndex(tiny_run[0].out, limits=ServiceLimits(max_image_pixels=4_000_000, max_request_pixels=5_000_000),
                       warm=("knn",))
    decoded = []
    real = pipelines.ingest.validate_image
    monkeypatch.setattr(pipelines.ingest, "validate_image", lambda data, **kw: decoded.append(1) or real(data, **kw))
    with pytest.raises(RequestError, match="over 5000000 pixels") as e:
        index.parse({"method": "knn", "queries": [{"image": img}, {"image": img}]})
    assert e.value.status == 413 and decoded == []
    with pytest.raises(RequestError, match="not an image") as e:
        index.parse({"method": "knn", "queries": [{"image": base64.b64encode(b"nope").decode()}]})
    assert e.value.status == 422


def test_decode_time_budget_stops_decoding(tiny_run, monkeypatch):
    """Issue 11 item 8: once a request has spent max_decode_seconds decoding, no further image of it
    is decoded (413), so a request of many slow-to-decode images cannot hold a replica."""
    import base64
    import io
    import time

    from PIL import Image

    import pipelines.ingest
    from pipelines.service import QueryIndex

    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    index = QueryIndex(tiny_run[0].out, limits=ServiceLimits(max_decode_seconds=0.05), warm=("knn",))
    decoded = []
    real = pipelines.ingest.validate_image

    def slow_decode(data, **kw):  # each decode as slow as a 6000x6000 PNG, scaled down
        decoded.append(1)
        time.sleep(0.03)
        return real(data, **kw)

    monkeypatch.setattr(pipelines.ingest, "validate_image", slow_decode)
    with pytest.raises(RequestError, match="took over 0.05 s") as e:
        index.parse({"method": "knn", "queries": [{"image": img}] * 10})
    assert e.value.status == 413 and len(decoded) == 2  # stopped after the budget, not after 10 decodes


def _trickle_request(client: str, declared: int = 1000):
    """A request whose body sends 10 bytes and then stalls (never more_body=False)."""
    from starlette.requests import Request

    headers = [(b"content-length", str(declared).encode()), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/query", "raw_path": b"/query", "headers": headers, "query_string": b"",
             "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000), "client": (client, 50000), "http_version": "1.1"}
    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b"x" * 10, "more_body": True}
        await asyncio.sleep(3600)

    return Request(scope, receive)


def test_slow_uploads_are_capped_per_client_and_overall_and_time_out():
    """Issue 11 item 2 (HTTP layer): bodies still arriving after slow_upload_s count against a
    per-client cap (429) and an overall cap (503); every body must be whole within body_timeout_s
    (408); a prompt body is never counted, even from a client at its cap."""
    index = FakeIndex()
    index.limits = ServiceLimits(body_timeout_s=0.6, slow_upload_s=0.05, max_slow_uploads=4, max_slow_uploads_per_client=2)
    guard = ray_serve.UploadGuard(index.limits)

    async def echo(parsed):
        return {"ranked": parsed}

    async def go():
        clients = ["10.0.0.1"] * 3 + ["10.0.0.2"] * 2 + ["10.0.0.3"]
        slow = [asyncio.create_task(ray_serve.handle_request(_trickle_request(c), index, echo, guard)) for c in clients]
        await asyncio.sleep(0.2)  # every slow one has been counted or refused by now
        counted = (guard.total, dict(guard.by_client))
        from starlette.requests import Request

        scope = _trickle_request("10.0.0.1").scope | {"headers": [(b"content-length", str(len(OK_BODY)).encode()),
                                                                   (b"content-type", b"application/json")]}
        msgs = [{"type": "http.request", "body": OK_BODY, "more_body": False}]

        async def receive():
            return msgs.pop(0)

        prompt = await ray_serve.handle_request(Request(scope, receive), index, echo, guard)
        done = await asyncio.gather(*slow)
        return counted, prompt, [r.status_code for r in done], done

    counted, prompt, statuses, responses = asyncio.run(go())
    assert counted == (4, {"10.0.0.1": 2, "10.0.0.2": 2})
    assert prompt.status_code == 200  # a whole body from a client at its cap is answered
    assert statuses == [408, 408, 429, 408, 408, 503]
    assert responses[2].headers["retry-after"] == "1" and b"slow uploads" in responses[2].body
    assert b"not received within 0.6 s" in responses[0].body
    assert guard.total == 0 and guard.by_client == {}  # every slot given back


def test_client_leaving_mid_body_is_a_4xx_not_a_500():
    from starlette.requests import Request

    scope = _trickle_request("10.0.0.9").scope
    msgs = [{"type": "http.request", "body": b'{"queries"', "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return msgs.pop(0)

    async def go():
        async def echo(parsed):
            return {"ranked": parsed}

        return await ray_serve.handle_request(Request(scope, receive), FakeIndex(), echo, None)

    resp = asyncio.run(go())
    assert resp.status_code == 400 and b"disconnected" in resp.body
