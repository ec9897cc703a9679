"""The query service under abuse: valid-query latency while 64 clients stall uploads and a stream
of malformed requests runs; what every abusive request got; which sockets the process tree listens on.

    python -m pipelines.benchmarks.abuse --n 20000 --seconds 15

Builds (once) a synthetic-manifold run directory (as `serve_load`), starts the Ray Serve query
service on loopback (embedded Ray, one replica, default `ServiceLimits`), then:

1. quiet: one client sends valid single-query requests for `--seconds`;
2. the same client while `--stalled` connections each send headers and part of a body and then
   stall (a refused one is replaced at once, so `--stalled` stall all the time);
3. the same client while another sends one malformed request every `--bad-interval` s, cycling
   through 31 kinds (`malformed_requests`);
4. both attacks at once.
The attackers run in their own processes.

Reports the valid requests' latency percentiles in both phases (and their ratio), /healthz latency
under abuse, the status counts of stalled and malformed requests (every one must be a 4xx or a
503, never a 500 or a hang), whether the replica process changed, and the listening-socket table
of the process tree (embedded Ray + Serve). Writes JSON + Markdown.
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import logging
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pipelines.logs import setup_logging

log = logging.getLogger("abuse")


def _png(width: int, height: int) -> str:
    """A small PNG that declares width x height (a decompression bomb in miniature when large)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def malformed_requests(dim: int) -> list[tuple[str, str, str, bytes]]:
    """(name, HTTP method, path, body) of each malformed request kind; all POSTs are sent as JSON
    except the content-type probe."""
    q = lambda payload: json.dumps(payload).encode()  # noqa: E731
    vec = [0.1] * dim
    return [
        ("not JSON", "POST", "/query", b"{not json"),
        ("empty body", "POST", "/query", b""),
        ("JSON nested 100,000 deep", "POST", "/query", b"[" * 100_000 + b"]" * 100_000),
        ("top level is a list", "POST", "/query", q([1, 2])),
        ("unknown field", "POST", "/query", q({"queries": [{"vector": vec}], "hots": 1})),
        ("method is a list", "POST", "/query", q({"queries": [{"vector": vec}], "method": ["knn"]})),
        ("unknown method", "POST", "/query", q({"queries": [{"vector": vec}], "method": "magic"})),
        ("topk negative", "POST", "/query", q({"queries": [{"vector": vec}], "topk": -3})),
        ("topk a boolean", "POST", "/query", q({"queries": [{"vector": vec}], "topk": True})),
        ("topk a string", "POST", "/query", q({"queries": [{"vector": vec}], "topk": "10"})),
        ("topk over the limit", "POST", "/query", q({"queries": [{"vector": vec}], "topk": 10**6})),
        ("queries not a list", "POST", "/query", q({"queries": "all"})),
        ("queries empty", "POST", "/query", q({"queries": []})),
        ("too many queries", "POST", "/query", q({"queries": [{"vector": vec}] * 1025})),
        ("query with two kinds", "POST", "/query", q({"queries": [{"vector": vec, "key": "a"}]})),
        ("unknown key", "POST", "/query", q({"queries": [{"key": "no-such-key"}]})),
        ("key not a string", "POST", "/query", q({"queries": [{"key": 7}]})),
        ("vector of wrong length", "POST", "/query", q({"queries": [{"vector": [1.0, 2.0]}]})),
        ("vector holds a string", "POST", "/query", q({"queries": [{"vector": ["x"] * dim}]})),
        ("vector of zeros", "POST", "/query", q({"queries": [{"vector": [0.0] * dim}]})),
        ("vector of 1e308", "POST", "/query", q({"queries": [{"vector": [1e308] * dim}]})),
        ("integer of 400 digits", "POST", "/query", b'{"queries": [{"vector": [' + b"9" * 400 + b"," + b"0.1," * (dim - 2) + b"0.1]}]}"),
        ("NaN in a vector", "POST", "/query", b'{"queries": [{"vector": [NaN' + b",0.1" * (dim - 1) + b"]}]}"),
        ("image not base64", "POST", "/query", q({"queries": [{"image": "***"}]})),
        ("image not an image", "POST", "/query", q({"queries": [{"image": base64.b64encode(b"GIF89a nope").decode()}]})),
        ("PNG declaring 6000x6000 (x3)", "POST", "/query", q({"queries": [{"image": _png(6000, 6000)}] * 3})),
        ("body over 32 MiB", "POST", "/query", b"x" * (32 * 1024 * 1024 + 16)),
        ("wrong content type", "POST-text", "/query", q({"queries": [{"vector": vec}]})),
        ("GET /query", "GET", "/query", b""),
        ("POST /healthz", "POST", "/healthz", b"{}"),
        ("unknown path", "POST", "/admin", b"{}"),
    ]


def _http(port: int, method: str, path: str, body: bytes, timeout: float = 60) -> tuple[int, float]:
    """One request on its own connection -> (status, seconds); status 0 when no response came."""
    import http.client

    ctype = "text/plain" if method == "POST-text" else "application/json"
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method.split("-")[0], path, body=body or None, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t
    except OSError:
        return 0, time.perf_counter() - t
    finally:
        conn.close()


class StalledUploads:
    """`n` connections that send headers and 12 bytes of a 1000-byte body, then stall; each one the
    service answers (refuses) is counted and replaced, so `n` stall at every moment."""

    HEAD = (b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"queries": ')

    def __init__(self, port: int, n: int):
        self.port, self.n = port, n
        self.statuses: collections.Counter = collections.Counter()
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        s.sendall(self.HEAD)
        self.opened += 1
        return s

    def _run(self) -> None:
        socks = [self._open() for _ in range(self.n)]
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(socks, [], [], 0.2)
                for s in ready:
                    data = s.recv(4096)
                    parts = data.split(b" ", 2)
                    self.statuses[int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0] += 1
                    s.close()
                    socks[socks.index(s)] = self._open()
        finally:
            for s in socks:
                s.close()

    def __enter__(self) -> "StalledUploads":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def attack(kind: str, port: int, seconds: float, stalled: int, interval: float, dim: int) -> dict:
    """Run one attacker for `seconds` (in its own process, so that it does not share the measuring
    client's interpreter): "stalled" keeps `stalled` uploads stalled, "malformed" sends one malformed
    request every `interval` s, cycling through the kinds. Returns what the service answered."""
    if kind == "stalled":
        with StalledUploads(port, stalled) as s:
            time.sleep(seconds)
        return {"opened": s.opened, "statuses": {str(k): v for k, v in s.statuses.items()}}
    kinds = malformed_requests(dim)
    out = {name: {"sent": 0, "statuses": collections.Counter()} for name, *_ in kinds}
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        for name, method, path, body in kinds:
            if time.monotonic() >= t_end:
                break
            t = time.monotonic()
            status, _ = _http(port, method, path, body)
            out[name]["sent"] += 1
            out[name]["statuses"][str(status)] += 1
            time.sleep(max(0.0, interval - (time.monotonic() - t)))
    return {k: {"sent": v["sent"], "statuses": dict(v["statuses"])} for k, v in out.items()}


class Attackers:
    """Attacker processes (`python -m pipelines.benchmarks.abuse --attack KIND ...`) for one phase."""

    def __init__(self, kinds: list[str], port: int, seconds: float, stalled: int, interval: float, dim: int):
        import subprocess

        self.procs = {k: subprocess.Popen([sys.executable, "-m", "pipelines.benchmarks.abuse", "--attack", k, "--port", str(port),
                                           "--seconds", str(seconds), "--stalled", str(stalled), "--bad-interval", str(interval),
                                           "--dim", str(dim)], stdout=subprocess.PIPE, text=True) for k in kinds}

    def results(self) -> dict:
        return {k: json.loads(p.communicate(timeout=600)[0]) for k, p in self.procs.items()}


def valid_phase(url: str, keys: list[str], seconds: float, method: str, topk: int) -> dict:
    """One client sending single-key queries back to back for `seconds`: latency percentiles (ms)."""
    from pipelines.client import QueryClient

    lat, health, errors = [], [], 0
    rng = np.random.default_rng(0)
    with QueryClient(url, timeout=60) as c:
        t_end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < t_end:
            i += 1
            t = time.perf_counter()
            try:
                c.query(keys=[keys[int(rng.integers(len(keys)))]], method=method, topk=topk)
                lat.append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001 - counted: a valid query must never fail
                errors += 1
            if i % 20 == 0:
                t = time.perf_counter()
                c.health()
                health.append(time.perf_counter() - t)
        pid = c.health()["pid"]
    ms = np.asarray(lat) * 1e3
    return {"requests": len(lat), "errors": errors, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "max_ms": float(ms.max()), "healthz_p50_ms": float(np.median(health) * 1e3) if health else None,
            "healthz_max_ms": float(np.max(health) * 1e3) if health else None, "pid": pid}


def markdown(res: dict) -> str:
    rows = [f"Service on a {res['n']:,}-image synthetic index, method `{res['method']}`, top-{res['topk']}, "
            f"{res['seconds']:g} s per phase, default `ServiceLimits`; attackers run in their own processes "
            f"({res['stalled_n']} stalled uploads; one malformed request every {res['bad_interval']:g} s).", "",
            "| phase | valid requests | errors | p50 ms | p95 ms | max ms | p50 / quiet | /healthz p50 ms | /healthz max ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    q50 = res["phases"]["quiet"]["p50_ms"]
    for name, r in res["phases"].items():
        hz = (f"{r['healthz_p50_ms']:.1f} | {r['healthz_max_ms']:.1f}" if r["healthz_p50_ms"] is not None else "- | -")
        rows.append(f"| {name} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['max_ms']:.1f} | "
                    f"{r['p50_ms'] / q50:.2f}x | {hz} |")
    rows += ["", f"Same replica process throughout: **{res['same_replica']}**.", ""]
    for name, st in res["stalled"].items():
        rows.append(f"Stalled uploads ({name}): {st['opened']} opened, answered {dict(sorted(st['statuses'].items()))}.")
    rows += ["", "| malformed request | sent | statuses |", "|---|---|---|"]
    merged: dict = {}
    for m in res["malformed"].values():
        for k, r in m.items():
            e = merged.setdefault(k, {"sent": 0, "statuses": collections.Counter()})
            e["sent"] += r["sent"]
            e["statuses"].update(r["statuses"])
    for name, r in merged.items():
        rows.append(f"| {name} | {r['sent']} | {', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))} |")
    rows += ["", "Listening sockets of the process tree (embedded Ray + Serve) during the run:", "",
             "| address | port | process |", "|---|---|---|"]
    rows += [f"| {s['address']} | {s['port']} | {s['name']} |" for s in res["listeners"]]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("runs/abuse"))
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--stalled", type=int, default=64)
    ap.add_argument("--bad-interval", type=float, default=0.02, help="seconds between malformed requests")
    ap.add_argument("--method", default="diffusion")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--attack", choices=["stalled", "malformed"], help=argparse.SUPPRESS)  # attacker process
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.attack:
        sys.stdout.write(json.dumps(attack(args.attack, args.port, args.seconds, args.stalled, args.bad_interval, args.dim)))
        return 0
    setup_logging()

    from cluster.listeners import tree_listeners
    from cluster.local_cluster import free_port
    from cluster.ray_runtime import init_ray
    from cluster.ray_serve import start_service, stop_service
    from pipelines.benchmarks.serve_load import build_index_run
    from pipelines.service import QueryIndex

    run = build_index_run(args.out, args.n, 100, args.k)
    index = QueryIndex(run, warm=())
    init_ray("", num_cpus=2)
    port = free_port()
    url = start_service(run, port=port, num_cpus=1.0)
    phases, stalled, malformed = {}, {}, {}
    plan = [("quiet", []), (f"{args.stalled} stalled uploads", ["stalled"]), ("malformed stream", ["malformed"]),
            ("both", ["stalled", "malformed"])]
    try:
        valid_phase(url, index.keys, 2, args.method, args.topk)  # warm-up: the first answers build the rankers
        for name, kinds in plan:
            att = Attackers(kinds, port, args.seconds + 2, args.stalled, args.bad_interval, index.dim) if kinds else None
            if att:
                time.sleep(1.0)  # the attack is under way
            phases[name] = valid_phase(url, index.keys, args.seconds, args.method, args.topk)
            if name == "both":
                listeners = [{"address": s.address, "port": s.port, "name": s.name, "loopback": s.loopback}
                             for s in tree_listeners([os.getpid()])]
            got = att.results() if att else {}
            if "stalled" in got:
                stalled[name] = got["stalled"]
            if "malformed" in got:
                malformed[name] = got["malformed"]
    finally:
        stop_service()
    res = {"n": args.n, "method": args.method, "topk": args.topk, "seconds": args.seconds, "stalled_n": args.stalled, "bad_interval": args.bad_interval, "phases": phases,
           "same_replica": len({p["pid"] for p in phases.values()}) == 1, "stalled": stalled, "malformed": malformed,
           "listeners": listeners}
    seen = {int(s) for m in malformed.values() for v in m.values() for s in v["statuses"]}
    seen |= {int(s) for st in stalled.values() for s in st["statuses"]}
    bad_status = sorted(seen - set(range(400, 500)) - {503})
    errors = sum(p["errors"] for p in phases.values())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abuse.json").write_text(json.dumps(res, indent=1))
    (args.out / "abuse.md").write_text(markdown(res))
    sys.stdout.write(markdown(res))
    if bad_status or errors or not all(s["loopback"] for s in listeners):
        log.error("abuse: statuses outside 4xx/503 %s, %d failed valid queries, non-loopback listeners %s", bad_status, errors,
                  [s for s in listeners if not s["loopback"]])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
