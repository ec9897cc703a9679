"""Descriptor shards: `id` int64, `key` string, `vector` fixed-size list<float32>[d]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .shards import list_shards, read_table, write_table


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
        cols["regions"] = pa.array([r.tolist() for r in regions["regions"]], pa.list_(pa.list_(pa.float32(), d)))
        cols["region_boxes"] = pa.array([b.tolist() for b in regions["region_boxes"]], pa.list_(pa.list_(pa.float32(), 4)))
    return pa.table(cols)


def write_descriptors(path: Path, ids: np.ndarray, keys: list[str], X: np.ndarray, *, params: str, regions: dict | None = None) -> None:
    write_table(descriptor_table(ids, keys, X, regions), path, params=params)


def table_vectors(t: pa.Table) -> np.ndarray:
    col = t.column("vector").combine_chunks()
    d = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(t), d)


def load_descriptors(folder: str | Path, *, dense: bool = True) -> tuple[np.ndarray, list[str], np.ndarray]:
    """All shards of a descriptor folder: ids (n,) int64 ascending, keys, X (n, d) float32.

    Refuses NaN/inf rows, mixed dimensions, duplicate ids and (with dense=True) gaps in ids.
    """
    shards = list_shards(folder)
    if not shards:
        raise DescriptorError(f"no descriptor shards in {folder}")
    ids, keys, Xs, dims = [], [], [], set()
    for p in shards:
        t = read_table(p)
        if len(t) == 0:
            continue
        X = table_vectors(t)
        dims.add(X.shape[1])
        ids.append(t.column("id").to_numpy())
        keys.extend(t.column("key").to_pylist())
        Xs.append(X)
    if len(dims) > 1:
        raise DescriptorError(f"descriptor shards in {folder} have different dimensions: {sorted(dims)}")
    ids_a = np.concatenate(ids).astype(np.int64)
    X = np.concatenate(Xs)
    order = np.argsort(ids_a, kind="stable")
    ids_a, X, keys = ids_a[order], X[order], [keys[i] for i in order]
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad.size:
        raise DescriptorError(f"{bad.size} descriptors in {folder} contain NaN/inf (ids {ids_a[bad[:5]].tolist()})")
    if np.unique(ids_a).size != ids_a.size:
        raise DescriptorError(f"duplicate ids in {folder}")
    if dense and not np.array_equal(ids_a, np.arange(ids_a.size)):
        raise DescriptorError(f"ids in {folder} are not dense 0..{ids_a.size - 1}")
    return ids_a, keys, X
