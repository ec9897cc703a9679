"""`retrieval import-descriptors`: precomputed descriptors (.npy, .fvecs, .mat, Parquet) -> shards.

Users with published or precomputed descriptors go straight to graph and diffusion: the result is
a run directory with `descriptors/part-*.parquet` and `manifest.json` (and `queries/...` when a
query file is given), exactly as `retrieval extract` writes them.

An import is all or nothing: every input (database file, keys, query file, query keys) is read
and checked before anything is written, the shards are written into a new folder beside the run
directory, and only then swapped in by renames. A refused import leaves the previous run whole.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from .descriptors import DescriptorError, write_descriptors
from .shards import write_json

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
        try:
            X = np.load(path, allow_pickle=False)  # never unpickle: an object array is refused below
        except ValueError as e:
            if "pickle" in str(e):
                raise DescriptorError(f"{path} holds pickled Python objects (or is not a .npy file): refused, pickles are never "
                                      "loaded; save a numeric array") from None
            raise DescriptorError(f"{path} is not a readable .npy file: {e}") from None
        except (EOFError, OSError) as e:
            raise DescriptorError(f"{path} is not a readable .npy file (empty or truncated: {e})") from None
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
        try:
            X = (table_vectors(t) if getattr(t.schema.field("vector").type, "list_size", 0) > 0
                 else np.array(t.column("vector").to_pylist(), np.float32))
        except (ValueError, TypeError) as e:
            raise DescriptorError(f"{path}: the `vector` column is not a list of equal-length numeric vectors ({e})") from None
    else:
        raise DescriptorError(f"unsupported descriptor format {suf!r} (expected .npy, .fvecs, .mat or .parquet)")
    X = np.asarray(X)
    if X.dtype.kind not in "fiu":  # complex (the imaginary part would be dropped), strings, objects, records, bools
        raise DescriptorError(f"{path}: descriptors must be real numbers (float or integer), got dtype {X.dtype}")
    if X.ndim != 2:
        raise DescriptorError(f"{path}: descriptors must be a 2-D matrix, got shape {X.shape}")
    if transpose:
        X = X.T
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DescriptorError(f"{path}: no descriptors (shape {X.shape}: {'0 rows' if X.shape[0] == 0 else '0 dimensions'})")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused with the NaN/inf rows
        return np.ascontiguousarray(X, dtype=np.float32)


def read_keys(path: str | Path | None, n: int, prefix: str) -> list[str]:
    if not path:
        return [f"{prefix}{i:08d}" for i in range(n)]
    if not Path(path).is_file():
        raise DescriptorError(f"keys file not found: {path}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DescriptorError(f"keys file {path} is not readable UTF-8 text ({e})") from None
    keys = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(keys) != n:
        raise DescriptorError(f"{path} lists {len(keys)} keys for {n} descriptors")
    if len(set(keys)) != n:
        raise DescriptorError(f"{path} has duplicate keys")
    return keys


def check_matrix(X: np.ndarray, *, source: str, dim: int | None = None, normalize: bool = True) -> tuple[np.ndarray, bool]:
    """(n, d) float32 descriptors checked (finite, non-zero rows, dimension `dim` when given) and,
    with normalize, L2-normalised. Returns (X, whether this normalised them)."""
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad.size:
        raise DescriptorError(f"{source}: {bad.size} rows contain NaN/inf (first rows: {bad[:5].tolist()})")
    if dim is not None and X.shape[1] != dim:
        raise DescriptorError(f"{source}: dimension {X.shape[1]} does not match the database dimension {dim}")
    with np.errstate(over="ignore", under="ignore"):
        norms = np.linalg.norm(X, axis=1)
    if (norms == 0).any():
        raise DescriptorError(f"{source}: {(norms == 0).sum()} rows are all zero (or too small to normalise in float32)")
    if not np.isfinite(norms).all():  # values near float32's limit: normalising would give zero rows
        bad = np.flatnonzero(~np.isfinite(norms))
        raise DescriptorError(f"{source}: {bad.size} rows have a norm beyond float32's range (first rows: {bad[:5].tolist()}); rescale them")
    was_normalized = bool(np.allclose(norms, 1.0, atol=1e-3))
    if normalize and not was_normalized:
        X = (X / norms[:, None]).astype(np.float32)
    return X, bool(normalize and not was_normalized)


def import_matrix(X: np.ndarray, keys: list[str], out_dir: Path, *, shard_size: int, source: str, dim: int | None = None,
                  normalize: bool = True) -> dict:
    """Validate and write (n, d) descriptors as shards + manifest into out_dir (a fresh folder:
    `import_descriptors` builds the import beside the run and swaps it in)."""
    X, normalized = check_matrix(X, source=source, dim=dim, normalize=normalize)
    ddir = out_dir / "descriptors"
    if ddir.exists():
        shutil.rmtree(ddir)
    h = hashlib.sha256(X.tobytes()).hexdigest()[:16]
    for s, a in enumerate(range(0, X.shape[0], shard_size)):
        b = min(a + shard_size, X.shape[0])
        write_descriptors(ddir / f"part-{s:05d}.parquet", np.arange(a, b), keys[a:b], X[a:b], params=h)
    manifest = {"format_version": 1, "n": int(X.shape[0]), "dim": int(X.shape[1]), "source": source, "imported": True,
                "l2_normalized_on_import": normalized, "descriptors_sha256_16": h}
    write_json(manifest, out_dir / "manifest.json")
    log.info("import: %d x %d descriptors from %s -> %s", X.shape[0], X.shape[1], source, ddir)
    return manifest


# what an import owns in a run directory: replaced together, never some without the others (query
# descriptors of an earlier import belong to that import's database and go with it)
IMPORTED = ("descriptors", "manifest.json", "queries/descriptors", "queries/manifest.json")


def _swap_in(stage: Path, out: Path, items: tuple[str, ...] = IMPORTED) -> None:
    """Make out/<item> what stage/<item> is, for every item (absent from stage: removed from out),
    by renames; the previous items are set aside first and put back if a rename fails."""
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.previous-", dir=out.parent))
    done: list[tuple[Path, Path | None, bool]] = []  # (target, where its old version went, new one moved in)
    try:
        for item in items:
            target, new = out / item, stage / item
            old = None
            if target.exists() or target.is_symlink():
                old = aside / item.replace("/", "__")
                os.rename(target, old)
            done.append((target, old, False))
            if new.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(new, target)
                done[-1] = (target, old, True)
    except BaseException:
        for target, old, moved_in in reversed(done):
            if moved_in:
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            if old is not None:
                os.rename(old, target)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def import_descriptors(out: Path, database: Path, *, keys: Path | None = None, queries: Path | None = None,
                       query_keys: Path | None = None, variable: str = "", transpose: bool = False, shard_size: int = 100_000) -> dict:
    """Import a database (and optional query) descriptor file into run directory `out`.

    Everything is read and checked first; the import is then written beside `out` and swapped in,
    replacing `descriptors/`, `manifest.json` and `queries/descriptors/` + `queries/manifest.json`
    (removed when no query file is given) together. On any error the previous run is untouched."""
    out = Path(out)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DescriptorError(f"shard size must be a positive integer, got {shard_size!r}")
    if query_keys and not queries:
        raise DescriptorError("query keys given without a query descriptor file (--queries)")
    if out.exists() and not out.is_dir():
        raise DescriptorError(f"{out} exists and is not a folder")
    X = read_matrix(database, variable=variable, transpose=transpose)
    db_keys = read_keys(keys, X.shape[0], "db")
    X, _ = check_matrix(X, source=str(database), normalize=False)
    if queries:
        Q = read_matrix(queries, variable=variable, transpose=transpose)
        q_keys = read_keys(query_keys, Q.shape[0], "q")
        Q, _ = check_matrix(Q, source=str(queries), dim=X.shape[1], normalize=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.import-{uuid.uuid4().hex[:12]}"  # beside the run: renames stay on one filesystem
    stage.mkdir()  # (not mkdtemp: a new run directory gets the usual permissions)
    try:
        res = {"database": import_matrix(X, db_keys, stage, shard_size=shard_size, source=str(database))}
        if queries:
            res["queries"] = import_matrix(Q, q_keys, stage / "queries", shard_size=shard_size, source=str(queries), dim=X.shape[1])
        if out.is_dir():
            if not queries and (out / "queries" / "descriptors").exists():
                log.warning("import: no query file given: the query descriptors of the previous import in %s are removed", out)
            _swap_in(stage, out)
        else:
            os.rename(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return res
