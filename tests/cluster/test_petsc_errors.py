"""A PETSc solve that cannot run says why on one line (a ClusterError the CLI prints without a
traceback): mpiexec missing, petsc4py missing in the ranks, or the ranks' last words."""
import os
import stat

import numpy as np
import pytest

from cluster.errors import ClusterError
from cluster.petsc_solver import solve_with_mpiexec


def _fake_mpiexec(folder, stderr: str):
    folder.mkdir()
    exe = folder / "mpiexec"
    exe.write_text(f"#!/bin/sh\necho \"{stderr}\" >&2\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("stderr,message", [
    ("Traceback ...\nModuleNotFoundError: No module named 'petsc4py'", "petsc4py is not installed: install Open MPI"),
    ("rank 1: something broke", "PETSc solve failed (exit 1): rank 1: something broke"),
])
def test_failed_ranks_are_one_line(tmp_path, monkeypatch, stderr, message):
    _fake_mpiexec(tmp_path / "bin", stderr)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ClusterError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        solve_with_mpiexec(tmp_path, np.ones((1, 2)), np.zeros((1, 2), np.int64), reader="x:y", ranks=2, k=5)
    assert "\n" not in str(e.value)


def test_missing_mpiexec(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ClusterError, match="mpiexec not found"):
        solve_with_mpiexec(tmp_path, np.ones((1, 2)), np.zeros((1, 2), np.int64), reader="x:y", ranks=2, k=5)
