"""Shard I/O: atomic writes (temporary name, then rename) and skip-on-rerun checks.

Every Parquet shard carries its stage's parameter hash in its schema metadata; a shard is
"done" only when it exists, reads back, and was written with the same parameters.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
PARAMS_KEY = b"retrieval.params"
FORMAT_VERSION = 1


def write_with(path: str | Path, write: Callable[[str], None]) -> None:
    """Atomically create `path` with `write(tmp_path)` (any writer that takes a file name): written
    to a temporary name beside it, then renamed; nothing is left behind when the writer fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(table: pa.Table, path: str | Path, *, params: str = "") -> None:
    """Write a Parquet file atomically, tagging it with the producing parameters' hash. Columns of
    floating-point values (descriptor vectors, scores) are written without dictionary encoding."""
    meta = dict(table.schema.metadata or {})
    meta[PARAMS_KEY] = params.encode()
    table = table.replace_schema_metadata(meta)
    dictionary = [f.name for f in table.schema if not _has_floats(f.type)]
    write_with(path, lambda tmp: pq.write_table(table, tmp, use_dictionary=dictionary))


def _has_floats(t: pa.DataType) -> bool:
    """Whether a column type holds floating-point values (at any depth of lists/structs). Parquet's
    default dictionary encoding hashes every value and, with as many distinct values as floats have,
    gives up for plain encoding after a page: on a shard of 128 descriptors of 1280 dimensions it took
    7-9x the CPU time of a plain write and made the file 1.56x larger (BENCHMARKS.md)."""
    if pa.types.is_floating(t):
        return True
    return any(_has_floats(t.field(i).type) for i in range(t.num_fields))


def shard_done(path: str | Path, *, params: str = "") -> bool:
    """True when `path` is a readable Parquet file written with `params`."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        log.warning("shard %s is unreadable (%s); it will be recomputed", path, e)
        return False
    return meta.get(PARAMS_KEY, b"").decode() == params


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def write_json(obj: Any, path: str | Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    write_with(path, lambda tmp: Path(tmp).write_text(text))


def write_npz(path: str | Path, **arrays) -> None:
    """NumPy arrays to an .npz file, atomically (streamed to a temporary file, then renamed)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_with(path, write)


def write_bytes(data: bytes, path: str | Path) -> None:
    write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_json_or(path: str | Path, default: Any = None) -> Any:
    """A JSON file's content, or `default` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def list_shards(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("part-*.parquet"))
