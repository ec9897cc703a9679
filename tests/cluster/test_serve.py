"""The query service on Ray Serve over HTTP (embedded Ray): answers equal the in-process index,
bad requests get 4xx without harming the replica, the proxy and the replicas' own ports (Serve's
direct ingress) listen on loopback only; each request test runs through both."""
from __future__ import annotations

import json
import os
import socket

import pytest

from cluster.local_cluster import free_port
from pipelines.client import QueryClient, ServiceError
from pipelines.service import QueryIndex, ServiceLimits

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def service(ray_session, tiny_run):
    from ray import serve

    from cluster.ray_serve import replica_urls, start_service

    port = free_port()
    url = start_service(tiny_run[0].out, port=port, num_cpus=0.25, limits=ServiceLimits(max_queries=64, max_request_bytes=100_000,
                                                                                                    body_timeout_s=4, slow_upload_s=0.3))
    direct = replica_urls(port)
    assert len(direct) == 1 and direct[0] != url, direct  # the embedded Ray runs Serve with direct ingress
    yield {"proxy": (url, port), "direct": (direct[0], int(direct[0].rsplit(":", 1)[1]))}
    serve.shutdown()


@pytest.fixture(params=["proxy", "direct"])
def endpoint(request, service) -> tuple[str, int]:
    """(base URL, port) of the proxy, or of the replica answering directly."""
    return service[request.param]


def test_http_answers_equal_the_in_process_index(endpoint, tiny_run):
    url, _ = endpoint
    idx = QueryIndex(tiny_run[0].out)
    with QueryClient(url) as c:
        assert c.health()["n"] == len(idx.keys)
        for method in ("diffusion", "aqe", "none"):
            got = c.query(keys=idx.keys[:3], vectors=idx.X[5:7], method=method, topk=6)
            ref = idx.answer({"queries": [{"key": k} for k in idx.keys[:3]] + [{"vector": v.tolist()} for v in idx.X[5:7]],
                              "method": method, "topk": 6})
            assert [r["ids"] for r in got["results"]] == [r["ids"] for r in ref["results"]]
            assert c.server_ms is not None and c.server_ms > 0  # the handler's time, from the answer's Server-Timing


def test_bad_requests_get_4xx_and_the_replica_survives(endpoint):
    url, _ = endpoint
    with QueryClient(url) as c:
        pid = c.health()["pid"]
        cases = [
            (b"{not json", 400), (json.dumps({"queries": [{"key": "nope"}]}).encode(), 404),
            (json.dumps({"queries": [{"vector": [1.0]}]}).encode(), 422),
            (json.dumps({"queries": [{"vector": [1.0] * 16}] * 65}).encode(), 413),  # too many queries
            (b"x" * 200_000, 413),  # body over the limit
            (json.dumps({"queries": [{"image": "AAAA"}]}).encode(), 422),  # not an image
        ]
        for body, status in cases:
            got, data = c.post_raw(body)
            assert got == status and data["error"], (body[:40], got, data)
        with pytest.raises(ServiceError) as e:
            c.query(keys=["nope"])
        assert e.value.status == 404
        assert c.post_raw(b"{}", path="/elsewhere")[0] == 404
        assert c.health()["pid"] == pid  # same replica process: nothing crashed


def test_replica_runs_with_its_environment(service):
    """The replica process has REPLICA_ENV (malloc arenas capped, OpenMP threads sleeping when idle),
    and faiss searches on as many threads as the solvers use (one per core), not on the replica's
    num_cpus (1) that Ray's OMP_NUM_THREADS would give it."""
    from cluster.ray_serve import REPLICA_ENV

    with QueryClient(service["direct"][0]) as c:
        health = c.health()
    pid = health["pid"]
    assert health["search_threads"] == os.cpu_count()
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    for key, value in REPLICA_ENV["env_vars"].items():
        assert env.get(key.encode()) == value.encode(), key


def test_proxy_binds_to_loopback_only(endpoint):
    _, port = endpoint
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # this machine's outward address (no packet is sent)
        s.connect(("192.0.2.1", 9))
        ip = s.getsockname()[0]
    if ip.startswith("127."):
        pytest.skip("no non-loopback interface")
    with pytest.raises(OSError):
        socket.create_connection((ip, port), timeout=3).close()


def test_embedded_ray_and_the_service_listen_on_loopback_only(service):
    """Issue 11: every listening socket of this process tree (the embedded Ray's GCS, raylet, agents,
    metrics exporters, workers, Serve's proxy and replicas) is bound to 127.0.0.1."""
    import os

    from cluster.listeners import tree_listeners

    ports = {port for _, port in service.values()}
    socks = tree_listeners([os.getpid()])
    assert ports <= {s.port for s in socks} and len(socks) >= 6, socks
    assert [s for s in socks if not s.loopback] == []


def test_batch_wait_follows_the_ranking_cost():
    """serve.batch's wait: a fraction of recent batches' ranking time (averaged), plus the fixed
    wait, capped; none but the fixed wait after a batch of `wide` queries or more; bad settings refused."""
    from cluster.ray_serve import BatchWait

    w = BatchWait(0.0, 0.02, smoothing=0.5)
    assert w.wait_s == 0.0  # nothing ranked yet: no wait
    assert w.after(0.003) == pytest.approx(0.00006)  # a truncated query: a few hundredths of a ms
    assert w.after(0.003) == pytest.approx(0.00006)
    assert w.after(0.250) == pytest.approx(0.02 * (0.5 * 0.250 + 0.5 * 0.003))  # averaged, not the last alone
    for _ in range(20):
        w.after(0.250)
    assert w.wait_s == pytest.approx(0.005, rel=1e-3)  # an exact solve at 10^5: 5 ms
    assert w.after(0.250, 256) == 0.0  # after a batch of 256 queries: no wait for company
    assert w.after(0.250, 31) == pytest.approx(0.005, rel=1e-3)  # a narrow batch again: the wait is back
    assert BatchWait(0.001, 0.02).after(0.5, 32) == 0.001  # wide: the fixed wait alone
    assert BatchWait(0.001, 0.0).after(1.0) == 0.001  # the fixed wait alone
    assert BatchWait(0.0, 1.0, max_s=0.05).after(10.0) == 0.05  # capped
    for bad in [dict(fixed_s=-1), dict(fraction=-0.1), dict(smoothing=0), dict(wide=0)]:
        with pytest.raises(ValueError):
            BatchWait(**bad)


def test_cheap_rankings_run_on_the_event_loop_and_costly_ones_in_threads():
    """Where a batch ranks: on the replica's event loop only when every method in it has been seen
    and its queries together are expected under 2 ms (per-query costs averaged per method); an
    unseen method, an exact solve or a wide batch of cheap queries goes to a thread. Requests of a
    few key or vector queries are parsed on the loop, any image or more queries in a thread."""
    from cluster.ray_serve import LIGHT_QUERIES, RankCosts, light

    c = RankCosts(inline_s=0.002, smoothing=0.5)
    assert not c.inline(["precomputed"], 1)  # never ranked: a thread
    c.record(["precomputed"], 1, 0.0004)
    assert c.inline(["precomputed"], 1) and c.inline(["precomputed"], 4) and not c.inline(["precomputed"], 5)  # 4 x 0.4 ms < 2 ms
    c.record(["diffusion"], 2, 0.5)
    assert not c.inline(["diffusion"], 1) and not c.inline(["precomputed", "diffusion"], 1)  # the costliest method decides
    c.record(["precomputed"], 1, 0.0024)  # averaged: (0.4 + 2.4) / 2 = 1.4 ms
    assert c.per_query["precomputed"] == pytest.approx(0.0014) and c.inline(["precomputed"], 1) and not c.inline(["precomputed"], 2)
    assert light({"queries": [{"key": "a"}, {"vector": [0.0]}]}) and light({"queries": [{"key": "a"}] * LIGHT_QUERIES})
    assert not light({"queries": [{"key": "a"}] * (LIGHT_QUERIES + 1)}) and not light({"queries": [{"key": "a"}, {"image": "..."}]})
    assert not light([1, 2]) and not light({"queries": "x"})


def _status(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        head += chunk
    return int(head.split()[1])


def test_stalled_uploads_do_not_block_valid_queries(endpoint, tiny_run):
    """Issue 11 item 2, over real HTTP on loopback: 64 clients send headers and part of a body, then
    stall. Valid queries and /healthz keep answering meanwhile; each stalled upload is refused
    (429 past the per-client cap at once, 408 once body_timeout_s has passed)."""
    import time

    url, port = endpoint
    idx = QueryIndex(tiny_run[0].out)
    stalled = []
    for _ in range(64):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"queries\": ")
        stalled.append(s)
    t0 = time.monotonic()
    try:
        time.sleep(0.5)
        lat = []
        with QueryClient(url, timeout=10) as c:
            for i in range(10):
                t = time.perf_counter()
                got = c.query(keys=idx.keys[i:i + 1], method="none", topk=5)
                lat.append(time.perf_counter() - t)
                assert got["results"][0]["keys"][0] == idx.keys[i]
            assert c.health()["status"] == "ok"
        statuses = [_status(s) for s in stalled]
        waited = time.monotonic() - t0
    finally:
        for s in stalled:
            s.close()
    assert max(lat) < 2.0, lat  # answered while the uploads stall (not after body_timeout_s)
    assert sorted(set(statuses)) == [408, 429] and statuses.count(408) == 8, statuses  # 8 = per-client cap
    assert waited < 4 + 5, waited


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_retrieval_serve_command(tiny_run, tmp_path, stop_signal):
    """`retrieval serve RUN` as documented: starts, answers, stops on Ctrl-C or SIGTERM quietly
    (exit 0, no traceback; its own embedded Ray)."""
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", tiny_run[0].out, "--port", str(port), "--num-cpus", "0.25"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        c = QueryClient(f"http://127.0.0.1:{port}")
        t0 = time.monotonic()
        while True:
            try:
                c.health()
                break
            except (OSError, ServiceError):
                assert p.poll() is None and time.monotonic() - t0 < 180, p.stdout.read() if p.poll() is not None else "timeout"
                time.sleep(1)
        idx = QueryIndex(tiny_run[0].out)
        got = c.query(keys=idx.keys[:2], method="diffusion", topk=3)
        assert [r["keys"][0] for r in got["results"]] == [r["keys"][0] for r in idx.answer(
            {"queries": [{"key": k} for k in idx.keys[:2]], "method": "diffusion", "topk": 3})["results"]]
        c.close()
    finally:
        os.kill(p.pid, getattr(signal, stop_signal))
        try:
            out, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
    assert p.returncode == 0 and "query service stopped" in out and "Traceback" not in out, out[-3000:]
