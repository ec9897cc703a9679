"""Descriptor shards: `id` int64, `key` string, `vector` fixed-size list<float32>[d]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from retrieval.whitening import Whitening

from .shards import list_shards, write_bytes, write_table


class DescriptorError(ValueError):
    """Descriptor shards are missing, inconsistent, or contain invalid values."""


def descriptor_table(ids: np.ndarray, keys: list[str], X: np.ndarray, regions: dict | None = None) -> pa.Table:
    """Descriptor shard table; `regions` ({"regions": [(R, C)], "region_boxes": [(R, 4)]} per row)
    adds `regions` (list of list<float32>[C]) and `region_boxes` (list of list<float32>[4])."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    d = X.shape[1] if X.ndim == 2 else 0
    vec = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel(), pa.float32()), d)
    cols = {"id": pa.array(np.asarray(ids, np.int64)), "key": pa.array(keys, pa.string()), "vector": vec}
    if regions is not None:
        cols["regions"] = nested_vectors(regions["regions"], d)
        cols["region_boxes"] = nested_vectors(regions["region_boxes"], 4)
    return pa.table(cols)


def nested_vectors(arrays: list[np.ndarray], width: int) -> pa.ListArray:
    """Per row an (R_i, width) array -> list<fixed_size_list<float32>[width]>, built from one
    concatenated buffer and offsets (no Python object per value: 10^6 regions stay cheap)."""
    counts = np.array([len(a) for a in arrays], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = (np.concatenate([np.asarray(a, np.float32).reshape(-1, width) for a in arrays]) if len(arrays)
            else np.zeros((0, width), np.float32))
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), width)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), inner)


def write_descriptors(path: Path, ids: np.ndarray, keys: list[str], X: np.ndarray, *, params: str, regions: dict | None = None) -> None:
    write_table(descriptor_table(ids, keys, X, regions), path, params=params)


_PLAIN = {pa.float32(): np.float32, pa.float64(): np.float64, pa.int64(): np.int64, pa.int32(): np.int32}


def plain_values(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric column as numpy: without nulls, views of its data buffers (chunks concatenated);
    otherwise pyarrow's conversion. (pyarrow's `to_numpy` imports pandas, 0.2 s of a stage's start.)"""
    if isinstance(a, pa.ChunkedArray):
        parts = [plain_values(c) for c in a.chunks]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, _PLAIN.get(a.type, np.float64))
    dt = _PLAIN.get(a.type)
    if a.null_count == 0 and dt is not None:
        return np.frombuffer(a.buffers()[1], dtype=dt, count=len(a), offset=a.offset * np.dtype(dt).itemsize)
    return a.to_numpy(zero_copy_only=False)


def table_vectors(t: pa.Table, out: np.ndarray | None = None) -> np.ndarray:
    """The `vector` column as (n, d) float32, written into `out` when given (one copy per chunk:
    a fixed-size list's values are read in place)."""
    col = t.column("vector")
    d = col.type.list_size
    X = np.empty((len(t), d), np.float32) if out is None else out
    row = 0
    for chunk in col.chunks:
        if len(chunk) == 0:
            continue
        flat = plain_values(chunk.flatten())
        X[row:row + len(chunk)] = flat.reshape(len(chunk), d)
        row += len(chunk)
    return X


def load_descriptors(folder: str | Path, *, dense: bool = True, keys: bool = True) -> tuple[np.ndarray, list[str], np.ndarray]:
    """All shards of a descriptor folder: ids (n,) int64 ascending, keys (an empty list with
    keys=False: not read, a second per 10^6 rows saved), X (n, d) float32.

    Refuses NaN/inf rows, mixed dimensions, duplicate ids and (with dense=True) gaps in ids.
    Memory: X once, plus one shard's columns at a time (shards are read into a preallocated X).
    """
    import pyarrow.parquet as pq

    shards = list_shards(folder)
    if not shards:
        raise DescriptorError(f"no descriptor shards in {folder}")
    metas = [pq.read_schema(p) for p in shards]
    dims = {m.field("vector").type.list_size for m in metas}
    if len(dims) > 1:
        raise DescriptorError(f"descriptor shards in {folder} have different dimensions: {sorted(dims)}")
    rows = [pq.read_metadata(p).num_rows for p in shards]
    X = np.empty((sum(rows), dims.pop()), np.float32)
    ids, names, at = [], [], 0
    columns = ["id", "key", "vector"] if keys else ["id", "vector"]
    for p, n in zip(shards, rows):
        if n == 0:
            continue
        # batch by batch, without pre-buffering the file: decoding a whole 10^5-row shard at once
        # peaked at 4x its vectors' size (the graph stage at 10^5 went from 1.0 to 0.6 GiB)
        for b in pq.ParquetFile(p, pre_buffer=False).iter_batches(batch_size=16384, columns=columns, use_threads=False):
            t = pa.Table.from_batches([b])
            table_vectors(t, X[at:at + len(t)])
            ids.append(plain_values(t.column("id")))
            if keys:
                names.extend(t.column("key").to_pylist())
            at += len(t)
    pa.default_memory_pool().release_unused()  # Arrow's allocator would keep the decoded pages
    ids_a = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    if ids_a.size > 1 and not (np.diff(ids_a) > 0).all():  # shards are written in id order: usually no copy
        order = np.argsort(ids_a, kind="stable")
        ids_a, X, names = ids_a[order], X[order], [names[i] for i in order] if keys else names
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad.size:
        raise DescriptorError(f"{bad.size} descriptors in {folder} contain NaN/inf (ids {ids_a[bad[:5]].tolist()})")
    if ids_a.size > 1 and (np.diff(ids_a) == 0).any():  # sorted by now: a duplicate is a repeat of its predecessor
        raise DescriptorError(f"duplicate ids in {folder}")
    if dense and not np.array_equal(ids_a, np.arange(ids_a.size)):
        raise DescriptorError(f"ids in {folder} are not dense 0..{ids_a.size - 1}")
    return ids_a, names, X


def save_whitening(w: Whitening, path: Path, *, params: dict) -> None:
    """A whitening and the parameters it was learned with, written atomically as .npz."""
    import io

    buf = io.BytesIO()
    np.savez(buf, kind=np.array(w.kind), mean=w.mean, proj=w.proj, params=np.array(repr(params)))
    write_bytes(buf.getvalue(), path)


def load_whitening(path: Path) -> Whitening:
    """A whitening written by `save_whitening`."""
    with np.load(path, allow_pickle=False) as z:
        return Whitening(mean=z["mean"], proj=z["proj"], kind=str(z["kind"]))
