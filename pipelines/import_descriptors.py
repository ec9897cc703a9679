"""`retrieval import-descriptors`: precomputed descriptors (.npy, .fvecs, .mat, Parquet) -> shards.

Users with published or precomputed descriptors go straight to graph and diffusion: the result is
a run directory with `descriptors/part-*.parquet` and `manifest.json` (and `queries/...` when a
query file is given), exactly as `retrieval extract` writes them.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from .descriptors import DescriptorError, write_descriptors
from .shards import list_shards, write_json

log = logging.getLogger(__name__)


def read_fvecs(path: Path) -> np.ndarray:
    """texmex .fvecs: per vector an int32 dimension then that many float32 values."""
    raw = np.fromfile(path, dtype=np.int32)
    if raw.size == 0:
        raise DescriptorError(f"{path} is empty")
    d = int(raw[0])
    if d <= 0 or raw.size % (d + 1) != 0:
        raise DescriptorError(f"{path} is not a valid .fvecs file (dimension {d}, {raw.size} words)")
    rows = raw.reshape(-1, d + 1)
    if not (rows[:, 0] == d).all():
        raise DescriptorError(f"{path}: vectors of different dimensions (expected {d} everywhere)")
    return rows[:, 1:].copy().view(np.float32)


def read_matrix(path: Path, *, variable: str = "", transpose: bool = False) -> np.ndarray:
    """(n, d) float32 from .npy, .fvecs, .mat (a 2-D variable; d x n with transpose=True) or .parquet."""
    path = Path(path)
    if not path.is_file():
        raise DescriptorError(f"descriptor file not found: {path}")
    suf = path.suffix.lower()
    if suf == ".npy":
        X = np.load(path, allow_pickle=False)
    elif suf == ".fvecs":
        X = read_fvecs(path)
    elif suf == ".mat":
        import scipy.io as sio

        m = {k: v for k, v in sio.loadmat(path).items() if not k.startswith("__")}
        if variable:
            if variable not in m:
                raise DescriptorError(f"{path} has no variable {variable!r}; it has {sorted(m)}")
            X = m[variable]
        else:
            mats = {k: v for k, v in m.items() if isinstance(v, np.ndarray) and v.ndim == 2 and v.dtype.kind == "f"}
            if len(mats) != 1:
                raise DescriptorError(f"{path}: name the descriptor variable (--variable); float matrices: {sorted(mats)}")
            X = next(iter(mats.values()))
    elif suf == ".parquet":
        import pyarrow.parquet as pq

        from .descriptors import table_vectors

        t = pq.read_table(path)
        if "vector" not in t.column_names:
            raise DescriptorError(f"{path} has no `vector` column")
        X = table_vectors(t) if t.schema.field("vector").type.list_size > 0 else np.array(t.column("vector").to_pylist(), np.float32)
    else:
        raise DescriptorError(f"unsupported descriptor format {suf!r} (expected .npy, .fvecs, .mat or .parquet)")
    X = np.asarray(X)
    if X.ndim != 2:
        raise DescriptorError(f"{path}: descriptors must be a 2-D matrix, got shape {X.shape}")
    if transpose:
        X = X.T
    return np.ascontiguousarray(X, dtype=np.float32)


def read_keys(path: str | Path | None, n: int, prefix: str) -> list[str]:
    if not path:
        return [f"{prefix}{i:08d}" for i in range(n)]
    keys = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if len(keys) != n:
        raise DescriptorError(f"{path} lists {len(keys)} keys for {n} descriptors")
    if len(set(keys)) != n:
        raise DescriptorError(f"{path} has duplicate keys")
    return keys


def import_matrix(X: np.ndarray, keys: list[str], out_dir: Path, *, shard_size: int, source: str, dim: int | None = None,
                  normalize: bool = True) -> dict:
    """Validate and write (n, d) descriptors as shards + manifest into out_dir."""
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad.size:
        raise DescriptorError(f"{source}: {bad.size} rows contain NaN/inf (first rows: {bad[:5].tolist()})")
    if dim is not None and X.shape[1] != dim:
        raise DescriptorError(f"{source}: dimension {X.shape[1]} does not match the database dimension {dim}")
    norms = np.linalg.norm(X, axis=1)
    if (norms == 0).any():
        raise DescriptorError(f"{source}: {(norms == 0).sum()} rows are all zero")
    was_normalized = bool(np.allclose(norms, 1.0, atol=1e-3))
    if normalize and not was_normalized:
        X = (X / norms[:, None]).astype(np.float32)
    ddir = out_dir / "descriptors"
    for old in list_shards(ddir):
        old.unlink()
    h = hashlib.sha256(X.tobytes()).hexdigest()[:16]
    for s, a in enumerate(range(0, X.shape[0], shard_size)):
        b = min(a + shard_size, X.shape[0])
        write_descriptors(ddir / f"part-{s:05d}.parquet", np.arange(a, b), keys[a:b], X[a:b], params=h)
    manifest = {"format_version": 1, "n": int(X.shape[0]), "dim": int(X.shape[1]), "source": source, "imported": True,
                "l2_normalized_on_import": bool(normalize and not was_normalized), "descriptors_sha256_16": h}
    write_json(manifest, out_dir / "manifest.json")
    log.info("import: %d x %d descriptors from %s -> %s", X.shape[0], X.shape[1], source, ddir)
    return manifest


def import_descriptors(out: Path, database: Path, *, keys: Path | None = None, queries: Path | None = None,
                       query_keys: Path | None = None, variable: str = "", transpose: bool = False, shard_size: int = 100_000) -> dict:
    """Import a database (and optional query) descriptor file into run directory `out`."""
    X = read_matrix(database, variable=variable, transpose=transpose)
    res = {"database": import_matrix(X, read_keys(keys, X.shape[0], "db"), out, shard_size=shard_size, source=str(database))}
    if queries:
        Q = read_matrix(queries, variable=variable, transpose=transpose)
        res["queries"] = import_matrix(Q, read_keys(query_keys, Q.shape[0], "q"), out / "queries", shard_size=shard_size,
                                       source=str(queries), dim=X.shape[1])
    return res
