"""A child's peak memory is its own, not the resident set of the process that started it."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from pipelines.peak_memory import own_peak_gib, run_measured

ALLOC = "import numpy as np; x = np.ones(2**25); print(x.sum())"  # 0.25 GiB touched


def test_children_of_a_large_process_report_their_own_peak():
    """The test process holds 0.5 GiB: a plain wait4 / getrusage in the child reports at least
    that for `python -c pass` (the trap this module avoids); `run_measured` and `own_peak_gib`
    report the child's own peak: small for `pass`, >= 0.25 GiB for a child that touches 0.25 GiB."""
    big = np.ones(2**26)  # 0.5 GiB touched in this process
    inherited = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                               capture_output=True, text=True, check=True)
    assert int(inherited.stdout) / 2**20 >= 0.45  # what the old measurement saw
    small = run_measured([sys.executable, "-c", "pass"])
    assert small["returncode"] == 0 and small["peak_rss_gib"] < 0.1 and small["seconds"] > 0
    grown = run_measured([sys.executable, "-c", ALLOC], stdout=subprocess.DEVNULL)
    assert 0.25 <= grown["peak_rss_gib"] < 0.45
    own = subprocess.run([sys.executable, "-c", "from pipelines.peak_memory import own_peak_gib; print(own_peak_gib())"],
                         capture_output=True, text=True, check=True)
    assert float(own.stdout) < 0.2
    failed = run_measured([sys.executable, "-c", "import sys; sys.stderr.write('no'); sys.exit(3)"], stderr=subprocess.PIPE)
    assert failed["returncode"] == 3 and failed["stderr"] == b"no"
    assert own_peak_gib() >= 0.5 and big.sum() > 0
