"""`python -m cluster.local_cluster` stops every node it started when it gets SIGTERM: no process
of the nodes' process groups remains, and nothing the cluster started listens on the head's port."""
from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.listeners import listeners, process_tree

ROOT = Path(__file__).resolve().parents[2]


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of a live process; None if it is gone or a zombie (dead, only not yet reaped:
    in a container, PID 1 may never reap the orphans of a killed node)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[2])


def _processes() -> dict[int, tuple[int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                out[int(entry)] = st
    return out


def _in_groups(pgids: set[int]) -> list[int]:
    return [pid for pid, (_, pgid) in _processes().items() if pgid in pgids]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_a_termination_signal_stops_every_node(sig):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    p = subprocess.Popen([sys.executable, "-m", "cluster.local_cluster", "--workers", "0"], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in p.stdout], daemon=True).start()
    pgids: set[int] = set()
    try:
        seen, port, t0 = [], None, time.monotonic()
        while "job API:" not in "".join(seen):
            assert p.poll() is None and time.monotonic() - t0 < 200, "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            m = re.match(r"ray address: 127\.0\.0\.1:(\d+)", seen[-1])
            port = int(m.group(1)) if m else port
        assert port is not None and _accepts(port)
        # the nodes: `ray start` processes started by the cluster program, each leading its own process group
        pgids = {pid for pid, (ppid, pgid) in _processes().items() if ppid == p.pid and pgid == pid}
        assert pgids and len(_in_groups(pgids)) > len(pgids)  # the head's raylet, GCS, ... run in its group
        ours = process_tree([p.pid]) | set(_in_groups(pgids))
        assert [s for s in listeners(ours) if s.port == port]  # the head's GCS

        p.send_signal(sig)
        p.wait(timeout=120)
        t0 = time.monotonic()
        while _in_groups(pgids) and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        assert not _in_groups(pgids), [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in _in_groups(pgids)]
        # the freed port is in the ephemeral range: another process (a worker of this test session's own
        # Ray) may have been given it since, so the check is that none of the cluster's processes listens
        held = [s for s in listeners(ours) if s.port == port]
        assert not held, held
        assert p.returncode == 128 + sig
    finally:
        for pg in pgids | ({p.pid} if p.poll() is None else set()):  # what this test started, if the check failed
            try:
                os.killpg(pg, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if p.poll() is None:
            p.wait(timeout=30)
