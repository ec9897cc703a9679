#!/usr/bin/env bash
# Idempotent installer for this project on a fresh Debian machine (root, no GPU).
#   deploy/setup.sh            python environment (.venv) with the project installed
#   deploy/setup.sh --petsc    also MPI/PETSc (Debian packages) and petsc4py built against them
# Safe to rerun: each step is skipped when what it installs is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
want_petsc=0
[ "${1:-}" = "--petsc" ] && want_petsc=1
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip --disable-pip-version-check -q"
stamp="$VENV/.deps-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "installing python dependencies (torch/torchvision from the local wheel cache)"
  # torch and torchvision are pinned to the releases that lie on this machine's disk;
  # other versions would download a multi-GB CUDA build.
  # TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu in the container recipe) picks the build.
  $PIP install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1
  $PIP install -e '.[test]'
  touch "$stamp"
else
  log "python dependencies up to date"
fi

if [ "$want_petsc" = 1 ]; then
  if ! command -v mpiexec >/dev/null || [ ! -d /usr/lib/petsc ]; then
    log "installing MPI and PETSc from Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q petsc-dev libopenmpi-dev openmpi-bin
  fi
  if ! "$VENV/bin/python" -c "import petsc4py, mpi4py" 2>/dev/null; then
    log "building petsc4py 3.18 and mpi4py against the system PETSc/MPI (about two minutes)"
    $PIP install 'cython<3' 'setuptools<70' wheel
    PETSC_DIR=/usr/lib/petsc PETSC_ARCH= $PIP install --no-build-isolation 'petsc4py>=3.18,<3.19'
    $PIP install --no-build-isolation 'mpi4py>=3.1,<5'
    # the old setuptools was needed only to build petsc4py 3.18; torch wants a current one
    $PIP install 'setuptools>=77'
  fi
fi
log "ready: $VENV"
