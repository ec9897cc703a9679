"""Peak memory of a process: its own, not the high-water mark it inherits from the process that started it.

`getrusage(...).ru_maxrss` and `os.wait4`'s rusage of a child count, besides the child's own
peak, the resident set of the parent at the moment it forked: Linux keeps the larger of the two
through `exec`. A benchmark or an experiment runner holding 1 GiB therefore saw 1 GiB as the
peak of every child, even `python -c pass` (measured). Two ways around it:

- `own_peak_gib()`: in the process itself, `VmHWM` of /proc/self/status, the peak of its own
  address space since `exec` (falls back to ru_maxrss where there is no /proc);
- `run_measured(cmd)`: from the parent, the command is started by a small launcher that forks it
  and reports its `wait4` rusage: the inherited mark is then the launcher's (~10 MB).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# forks the command, waits for it, writes its rusage's ru_maxrss (KiB) to argv[1], exits with its status
_LAUNCHER = """import json, os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"maxrss_kib": ru.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def own_peak_gib() -> float:
    """This process's peak resident set (GiB) since it started its program."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_measured(cmd: list[str], **popen) -> dict:
    """Run `cmd` (keyword arguments go to `subprocess.Popen`) and wait for it. Returns `seconds`
    (wall), `peak_rss_gib` (the command's own peak resident set), `returncode` and, when it was
    piped, its `stderr` (bytes)."""
    fd, out = tempfile.mkstemp(prefix="peak-", suffix=".json")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, out, *cmd], **popen)
        _, err = proc.communicate()
        seconds = time.perf_counter() - t0
        with open(out) as f:
            text = f.read()
        peak = json.loads(text)["maxrss_kib"] / 2**20 if text else float("nan")
        return {"seconds": seconds, "peak_rss_gib": peak, "returncode": proc.returncode, **({"stderr": err} if err is not None else {})}
    finally:
        os.unlink(out)
