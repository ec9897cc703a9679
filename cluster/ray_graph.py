"""Sharded kNN search on Ray: each row shard of the database is searched against the whole index
in its own Ray task (the index travels once through the object store, serialised by faiss)."""
from __future__ import annotations

import numpy as np


def _search_shard(index_bytes: np.ndarray, X: np.ndarray, a: int, b: int, k: int, nprobe: int | None, ef: int | None):
    import faiss

    from retrieval.knn import search_index

    index = faiss.deserialize_index(index_bytes)
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = nprobe
    if ef is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = ef
    return a, *search_index(index, X[a:b], k, database=X)


def search_shards_ray(index, X: np.ndarray, bounds: list[tuple[int, int]], k: int, *, num_cpus: float = 1.0, progress=None):
    """(D, I) of shape (n, k) for all rows, one Ray task per (start, stop) shard in `bounds`."""
    import faiss
    import ray

    from .ray_runtime import require_ray

    require_ray("the sharded graph search (graph engine = ray)")
    nprobe = getattr(index, "nprobe", None)
    ef = index.hnsw.efSearch if hasattr(index, "hnsw") else None
    index_ref = ray.put(faiss.serialize_index(index))
    x_ref = ray.put(X)
    task = ray.remote(num_cpus=num_cpus)(_search_shard)
    pending = [task.remote(index_ref, x_ref, a, b, k, nprobe, ef) for a, b in bounds]
    n = X.shape[0]
    k = min(k, index.ntotal)
    D = np.empty((n, k), np.float32)
    I = np.empty((n, k), np.int64)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        a, Ds, Is = ray.get(done[0])
        D[a : a + len(Ds)], I[a : a + len(Is)] = Ds, Is
        if progress:
            progress(len(Ds))
    return D, I
