"""The PETSc/MPI install route: petsc4py solves a distributed CG under mpiexec and matches scipy."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.mpi


def _require_petsc():
    if shutil.which("mpiexec") is None:
        pytest.fail("mpiexec not found: run `deploy/setup.sh --petsc`")
    try:
        import petsc4py  # noqa: F401
        import mpi4py  # noqa: F401
    except ImportError as e:
        pytest.fail(f"petsc4py/mpi4py not importable ({e}): run `deploy/setup.sh --petsc`")


@pytest.mark.parametrize("ranks", [1, 2])
def test_petsc_cg_under_mpiexec_matches_scipy(ranks):
    _require_petsc()
    cmd = ["mpiexec", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), sys.executable, "-m", "cluster.petsc_smoke"]
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"PETSC_SMOKE_OK ranks={ranks}" in r.stdout
