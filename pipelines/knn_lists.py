"""The graph stage's saved self-kNN lists (`graph/knn.npz`): what a grown collection's graph is
updated from instead of rebuilt, with a hash of the rows they were searched for."""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from .shards import write_npz

log = logging.getLogger("pipelines.graph")  # the graph stage's messages, under its name


def rows_hashes(X: np.ndarray, cuts: list[int]) -> dict[int, str]:
    """{m: hash of X[:m]} for each m in cuts (0 < m <= n), in one pass over the rows (a running
    sha256 read at each cut; the rows as they are in memory, no bytes copy)."""
    import hashlib

    h, out, at = hashlib.sha256(), {}, 0
    for m in sorted({c for c in cuts if 0 < c <= X.shape[0]}):
        h.update(memoryview(np.ascontiguousarray(X[at:m])).cast("B"))
        out[m], at = h.copy().hexdigest()[:16], m
    return out


UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # a damaged knn.npz: a rebuild, not a failure


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def saved_header(gdir: Path) -> tuple[int, str, set] | None:
    """(rows, their hash, the shapes of D and I) of the saved kNN lists in `gdir`, from the file's
    small members and headers; None when there are none, or (with a warning) they are unreadable."""
    path = gdir / "knn.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            n0, h0 = int(z["rows"]), str(z["rows_sha256_16"])
        with zipfile.ZipFile(path) as zf:
            shapes = set()
            for name in ("D", "I"):
                with zf.open(f"{name}.npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shapes.add(tuple(read(f)[0]))
    except UNREADABLE as e:
        log.warning("graph: the saved kNN lists %s are unreadable (%s): building the graph again", path, first_line(e))
        return None
    return n0, h0, shapes


def save_knn(folder: Path, D: np.ndarray, I: np.ndarray, rows: int, rows_hash: str) -> None:
    """The self-kNN lists behind the graph (`knn.npz`; ids int32 or int64 as searched), with a
    hash of the `rows` rows they were searched for: what a later, grown collection needs to update
    the graph instead of rebuilding it."""
    write_npz(folder / "knn.npz", D=D.astype(np.float32, copy=False), I=I, rows=np.int64(rows), rows_sha256_16=np.array(rows_hash))
