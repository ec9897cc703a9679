"""A multi-node Ray cluster on one machine: a head and worker nodes as separate `ray start` processes.

Used by the multi-node tests and benchmarks, and handy for trying `retrieval submit` locally:

    python -m cluster.local_cluster --workers 1      # prints the addresses, Ctrl-C stops it

Every node binds to 127.0.0.1 (dashboard and job API included) and token authentication is on.
Each node runs `ray start --block` in its own process group, so one node can be killed (fault
tolerance tests) and the cluster torn down without touching any other Ray on the machine. Run as a
program, any termination signal (SIGTERM, SIGHUP, SIGINT) tears down every node it started, also
while the cluster is still starting.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cluster.ray_runtime import ensure_auth_token, loopback_node_env, serve_node_env

log = logging.getLogger(__name__)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (each socket held until all are chosen: ports
    picked one at a time can repeat, and a node given one port twice does not start)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.socket())
            socks[-1].bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


ROOT = Path(__file__).resolve().parents[1]


def _ray_start() -> list[str]:
    """`ray start` with every listener of the node on 127.0.0.1 (see cluster.ray_runtime)."""
    return [sys.executable, "-m", "cluster.ray_runtime"]


class LocalCluster:
    """Head + workers on 127.0.0.1 with token authentication; `shutdown()` kills every node."""

    def __init__(self, *, head_cpus: float = 1, log_dir: str | Path | None = None):
        self._taken: set[int] = set()  # ports handed to this cluster's nodes, never handed twice
        self.port, self.dashboard_port = self._ports(2)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_dir = Path(log_dir or os.environ.get("TMPDIR", "/tmp")) / f"ray-local-{self.port}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token = ensure_auth_token()
        # loopback mode for every process of the cluster and for drivers run in this environment
        self.env = dict(os.environ, **loopback_node_env(), **serve_node_env(), RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []
        try:
            self.head = self._start(["--head", f"--port={self.port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                     f"--dashboard-port={self.dashboard_port}"], head_cpus, "head")
            self.wait_nodes(1)
        except BaseException:  # a head that never came up (or a signal while waiting) is not left behind
            self.shutdown()
            raise

    def _start(self, args: list[str], cpus: float, name: str) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}-{len(self.nodes)}.log", "w")
        # every per-node port chosen free: another Ray on this machine (an embedded one, another
        # cluster) holds the defaults, and a node whose job agent cannot bind accepts no jobs
        names = ("dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export", "node-manager", "object-manager")
        ports = [f"--{name}-port={port}" for name, port in zip(names, self._ports(len(names)))]
        cmd = _ray_start() + ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--disable-usage-stats"] + ports + args
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.nodes.append(p)
        return p

    def _ports(self, count: int) -> list[int]:
        """`count` free ports, distinct from each other and from every port this cluster handed out
        before (a node may not have bound its ports yet when the next node's are chosen)."""
        out: list[int] = []
        while len(out) < count:
            for p in free_ports(count - len(out)):
                if p not in self._taken and p not in out:
                    out.append(p)
        self._taken.update(out)
        return out

    def add_worker(self, cpus: float = 1) -> subprocess.Popen:
        """Start a worker node and wait until the cluster counts it alive."""
        alive = len(self.alive_nodes())
        p = self._start([f"--address={self.address}"], cpus, "worker")
        self.wait_nodes(alive + 1)
        return p

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL a node's whole process group (raylet, its workers and actors): a node failure."""
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait(timeout=30)

    def _state(self, kind: str) -> list[dict]:
        """Rows of Ray's state API (`nodes`, `actors`, ...) through the dashboard, with the token."""
        req = urllib.request.Request(f"{self.dashboard_url}/api/v0/{kind}?limit=1000&detail=false",
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                data = json.loads(r.read())
        except OSError:
            return []
        return data.get("data", {}).get("result", {}).get("result", [])

    def alive_nodes(self) -> list[dict]:
        return [n for n in self._state("nodes") if n.get("state") == "ALIVE"]

    def alive_actors(self, class_contains: str = "") -> list[dict]:
        return [a for a in self._state("actors") if a.get("state") == "ALIVE" and class_contains in (a.get("class_name") or "")]

    def wait_nodes(self, n: int, *, timeout: float = 120) -> None:
        t0 = time.monotonic()
        while len(self.alive_nodes()) < n:
            if any(p.poll() is not None for p in self.nodes[-1:]):
                raise RuntimeError(f"ray node exited early; see {self.log_dir}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{n} Ray nodes not alive after {timeout} s; see {self.log_dir}")
            time.sleep(1)

    def shutdown(self) -> None:
        for p in reversed(self.nodes):
            if p.poll() is None:
                self.kill_node(p)
        cur = Path("/tmp/ray/ray_current_cluster")
        if cur.is_file() and cur.read_text().strip().endswith(f":{self.port}"):
            cur.unlink(missing_ok=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Terminated(BaseException):
    """A termination signal arrived (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def _on_stop_signal(signum, frame) -> None:
    for s in STOP_SIGNALS:  # a second signal must not interrupt the teardown
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A Ray head and worker nodes on this machine (loopback, token auth).")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--head-cpus", type=float, default=1)
    ap.add_argument("--worker-cpus", type=float, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)
    c = None
    code = 0
    try:
        c = LocalCluster(head_cpus=args.head_cpus)  # tears its own nodes down if interrupted while starting
        for _ in range(args.workers):
            c.add_worker(args.worker_cpus)
        print(f"ray address: {c.address}\njob API:     {c.dashboard_url}\n"
              f"submit with: retrieval submit CONFIG --address {c.dashboard_url}\nCtrl-C stops the cluster", flush=True)
        while True:
            time.sleep(3600)
    except Terminated as e:
        log.info("local cluster: %s, stopping every node", e)
        code = 0 if e.signum == signal.SIGINT else 128 + e.signum
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if c is not None:
            c.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
