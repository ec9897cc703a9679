"""k-nearest-neighbour search by inner product (faiss), with a numpy brute-force reference."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np

from . import row_blocks
from .scan import SCAN_MAX, scan_scores

log = logging.getLogger(__name__)

# faiss searches a flat index with BLAS only from queries x d = this (faiss 1.15: 128000; under 1,000 queries
# of 128 dims a per-pair loop 5-8x slower here from 16 queries up, BENCHMARKS.md): every batch takes BLAS.
FLAT_BLAS_THRESHOLD = 1


def set_flat_blas_threshold(value: int) -> int:
    """Set faiss's flat-search BLAS threshold (queries x d); returns the previous value."""
    old = int(faiss.cvar.distance_compute_blas_threshold)
    faiss.cvar.distance_compute_blas_threshold = int(value)
    return old


FAISS_DEFAULT_BLAS_THRESHOLD = set_flat_blas_threshold(FLAT_BLAS_THRESHOLD)


def set_search_threads(threads: int | None = None) -> int:
    """faiss's OpenMP threads for every later search in this process: `threads`, default one per core
    (as `retrieval.threads`); returns the count. In a Ray actor OpenMP starts at its num_cpus (Ray sets
    OMP_NUM_THREADS): a 1-CPU service replica searched on one thread while its solvers used every core."""
    n = max(1, threads or os.cpu_count() or 1)
    faiss.omp_set_num_threads(n)
    return n


def search_threads() -> int:
    return int(faiss.omp_get_max_threads())  # faiss's OpenMP threads in this process


def _as_f32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{name} has {bad.size} rows with NaN/inf values (first: {bad[:5].tolist()})")
    return x


def knn_search(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product with faiss IndexFlatIP.

    Args:
        queries: (nq, d) float32. database: (n, d) float32.
        k: neighbours per query; clipped to n.
    Returns: (D, I): (nq, k) float32 similarities (descending) and (nq, k) int64 database indices.
    """
    return flat_search(queries, _as_f32(database, "database"), k)


def flat_search(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`knn_search` over a database already checked (contiguous float32, finite: a ranker checks
    it once, not per call); the queries are checked. faiss's flat search without copying the
    database into an index."""
    q = _as_f32(queries, "queries")
    if database.dtype != np.float32 or not database.flags.c_contiguous:
        raise ValueError("flat_search: the database must be contiguous float32")
    if q.shape[1] != database.shape[1]:
        raise ValueError(f"dimension mismatch: queries d={q.shape[1]}, database d={database.shape[1]}")
    k = min(int(k), database.shape[0])
    D, I = faiss.knn(q, database, k, faiss.METRIC_INNER_PRODUCT)
    return D, I.astype(np.int64, copy=False)


def exact_search(queries: np.ndarray, database: np.ndarray, k: int, *, block_floats: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product as blocked matrix products (numpy's BLAS) and a partial sort.

    The same result as `knn_search` (ties ordered by lower index). Up to SCAN_MAX queries the
    scores come from one pass over the database (`retrieval.scan`), more from BLAS. Under 16
    queries it is faster than faiss's flat index on this project's machines (1e5 x 128: 2.5 vs 6.0
    ms for one query, 3.2 vs 11.2 for two), from 16 on faiss (with BLAS for every batch,
    FLAT_BLAS_THRESHOLD) is: `KnnRanker` picks by batch size (BENCHMARKS.md). Memory: one
    (block, n) float32 score block of at most `block_floats` values. Args: queries (nq, d) and
    database (n, d) float32 (pass it contiguous float32 to avoid a copy). Returns (D, I):
    (nq, min(k, n)) similarities descending and int64 indices.
    """
    q = _as_f32(queries, "queries")
    x = np.ascontiguousarray(database, dtype=np.float32)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"dimension mismatch: queries d={q.shape[1]}, database d={x.shape[1]}")
    n, nq = x.shape[0], q.shape[0]
    k = max(0, min(int(k), n))
    D, I = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
    if k == 0:
        return D, I
    step = max(1, block_floats // max(n, 1))
    for a in range(0, nq, step):
        S = scan_scores(q[a : a + step], x) if min(step, nq - a) <= SCAN_MAX else q[a : a + step] @ x.T
        part = np.argpartition(S, n - k, axis=1)[:, n - k :]  # the k largest, unordered
        vals = np.take_along_axis(S, part, 1)
        # rows with ties at the cut: argpartition kept arbitrary ones of the tied items; take the
        # lowest indices among them, as the reference does
        cut = vals.min(axis=1)
        for r in np.flatnonzero((S >= cut[:, None]).sum(axis=1) > k):
            c = np.flatnonzero(S[r] >= cut[r])
            part[r] = c[np.lexsort((c, -S[r, c]))][:k]
            vals[r] = S[r, part[r]]
        order = np.lexsort((part, -vals), axis=1)  # by score, ties by lower index
        D[a : a + step], I[a : a + step] = np.take_along_axis(vals, order, 1), np.take_along_axis(part, order, 1)
    return D, I


def range_pairs(X: np.ndarray, threshold: float, *, block: int = 1 << 14) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i != j, of rows of X ((n, d) float32) with inner product above `threshold`, by
    exact range search (faiss flat index; `block` query rows a call). Returns int64 (rows, cols)."""
    x = _as_f32(X, "database")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    rows, cols = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for a in range(0, len(x), block):
        lims, _, ids = index.range_search(x[a : a + block], float(threshold))
        rows.append(np.repeat(np.arange(a, a + len(lims) - 1), np.diff(lims.astype(np.int64))))  # faiss: size_t offsets
        cols.append(ids)
    r, c = np.concatenate(rows), np.concatenate(cols)
    return r[r != c], c[r != c]


def knn_search_numpy(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference for `knn_search` (same shapes; ties broken by lower index)."""
    q = _as_f32(queries, "queries")
    x = _as_f32(database, "database")
    k = min(int(k), x.shape[0])
    S = q @ x.T
    I = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, I, axis=1), I.astype(np.int64)


def full_ranking(queries: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All database items ranked per query: (nq, n) float32 scores and (nq, n) int64 indices."""
    return knn_search(queries, database, database.shape[0])


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index searches the database.

    kind: "flat" (exact), "ivf" (IVF-Flat, inverted lists), "hnsw" (HNSW-Flat), or "auto"
    (flat up to `auto_flat_max` vectors, HNSW above: on the scale benchmark HNSW reached recall
    0.95 at 10^6 in under 3 minutes where IVF needed ~10x longer). nlist = 0 picks ~4 sqrt(N) lists.
    storage: how an HNSW index keeps its vectors: "float" (float32), "fp16" (half the bytes per
    distance) or "sq8" (faiss's scalar quantizer, 8 bits per dimension with ranges trained on a
    sample: a quarter; at 10^6 x 128 the build 1.4x and the search 1.2x faster, BENCHMARKS.md).
    A quantized index's searches given the float rows are re-scored exactly (`search_index`,
    `search_self`: REFINE x k candidates, the top k by exact similarity kept). Flat and IVF
    indexes keep float32.
    """

    kind: str = "auto"
    nlist: int = 0
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    train_size: int = 200_000
    auto_flat_max: int = 200_000
    seed: int = 0
    storage: str = "float"

    def resolve(self, n: int) -> "IndexSpec":
        kind = self.kind
        if kind == "auto":
            kind = "flat" if n <= self.auto_flat_max else "hnsw"
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown index kind {self.kind!r}; expected flat, ivf, hnsw or auto")
        if self.storage not in HNSW_STORAGES:
            raise ValueError(f"unknown index storage {self.storage!r}; expected one of {', '.join(HNSW_STORAGES)}")
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
        return dataclasses.replace(self, kind=kind, nlist=nlist, storage=self.storage if kind == "hnsw" else "float")


HNSW_STORAGES: tuple[str, ...] = ("float", "fp16", "sq8")
_QUANTIZERS = {"fp16": "QT_fp16", "sq8": "QT_8bit"}
# a quantized index is searched for REFINE x k candidates, re-scored exactly: at 10^6 x 128 (HNSW
# M 24, sq8) the self-kNN's recall@51 is 0.948 with 51 candidates and 0.953 with 64 (flat: 0.954)
REFINE = 1.25
REFINE_CHUNK = 1 << 15  # rows searched and re-scored per step


def quantized(index: faiss.Index) -> bool:
    """Whether `index` scores with quantized vectors (HNSW over faiss's scalar quantizer)."""
    return isinstance(index, faiss.IndexHNSW) and isinstance(faiss.downcast_index(index.storage), faiss.IndexScalarQuantizer)


def search_width(index: faiss.Index, k: int) -> int:
    """Candidates to search for a top k: REFINE x k for a quantized index (`quantized`), else k;
    at most the index's rows."""
    return min(math.ceil(REFINE * k) if quantized(index) else int(k), index.ntotal)


def refine_exact(queries: np.ndarray, database, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-scoring of candidate lists: each query's inner products with its candidate rows,
    the top k of them by similarity (ties in candidate order), REFINE_CHUNK queries per pass over
    the database (`retrieval.row_blocks.refine`). queries (nq, d) float32; database (n, d) float32
    rows: an array, or a row source read a block at a time (`pipelines.row_file.RowFile`); I (nq, c)
    candidate rows (-1: none; a row past the database is refused). Returns (D, I) (nq, min(k, c)):
    float32 descending (-inf where none) and ids of I's dtype (-1 where none)."""
    q = _as_f32(queries, "queries")
    if len(database.shape) != 2 or database.shape[1] != q.shape[1]:
        raise ValueError("refine_exact: the database must be (n, d) rows of the queries' dimension")
    nq, c = I.shape
    k = min(int(k), c)
    D_out, I_out = np.empty((nq, k), np.float32), np.empty((nq, k), I.dtype)
    for a in range(0, nq, REFINE_CHUNK):
        b = min(nq, a + REFINE_CHUNK)
        D_out[a:b], I_out[a:b] = row_blocks.refine(q[a:b], database, I[a:b], k)
    return D_out, I_out


def build_index(X: np.ndarray, spec: IndexSpec = IndexSpec()) -> faiss.Index:
    """A trained and filled inner-product index over the rows of X ((n, d) float32)."""
    x = _as_f32(X, "database")
    n, d = x.shape
    spec = spec.resolve(n)
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, spec.nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = spec.nprobe
    elif spec.storage == "float":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWSQ(d, getattr(faiss.ScalarQuantizer, _QUANTIZERS[spec.storage]), spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:  # IVF's lists, the scalar quantizer's ranges: on a sample of at most train_size rows
        rng = np.random.default_rng(spec.seed)
        index.train(x if n <= spec.train_size else x[np.sort(rng.choice(n, spec.train_size, replace=False))])
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = spec.ef_construction
        index.hnsw.efSearch = spec.ef_search
    index.add(x)
    return index


def write_index(index: faiss.Index, path: str) -> None:
    """Store a faiss index in the file `path` (streamed by faiss: no in-memory copy)."""
    faiss.write_index(index, str(path))


def read_index(path: str) -> faiss.Index:
    """A faiss index stored by `write_index`."""
    return faiss.read_index(str(path))


def set_search_effort(index: faiss.Index, effort: int) -> None:
    """How hard an approximate index searches: HNSW's efSearch, IVF's nprobe (flat: no-op)."""
    hnsw = getattr(index, "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = int(effort)
    elif hasattr(index, "nprobe"):
        index.nprobe = int(effort)


def stored_vectors(index: faiss.Index) -> np.ndarray | None:
    """The (ntotal, d) float32 vectors a flat or HNSW-flat index stores, as a view into the index
    (no copy; valid while the index lives), or None for an index that stores no plain vectors."""
    storage = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    if not isinstance(storage, faiss.IndexFlat) or storage.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(storage.ntotal, storage.d)


def search_index(index: faiss.Index, queries: np.ndarray, k: int, *, database: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) of shape (nq, k): similarities descending and int64 ids (-1 where fewer found). A
    quantized index (`quantized`) given `database`, the float rows it was built from, has its
    candidates re-scored exactly (`refine_exact`); without them its scores are its own."""
    q = _as_f32(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"dimension mismatch: queries d={q.shape[1]}, index d={index.d}")
    k = min(int(k), index.ntotal)
    if database is None or not quantized(index):
        D, I = index.search(q, k)
        return D, I.astype(np.int64)
    _, I = index.search(q, search_width(index, k))
    return refine_exact(q, database, I, k)


def shard_bounds(n: int, nshards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [start, stop) of `nshards` near-equal shards (faiss contrib style)."""
    nshards = max(1, min(nshards, n))
    cuts = [n * i // nshards for i in range(nshards + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(nshards)]


def search_shards(
    index: faiss.Index,
    X: np.ndarray,
    k: int,
    bounds: list[tuple[int, int]],
    *,
    progress: Callable[[int], None] | None = None,
    ids: type = np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """Search the rows of X against `index`, one (start, stop) row shard at a time. X holds the
    index's own rows (a self-search): a quantized index's lists are re-scored on them.

    Memory stays O(n k) for the result plus one shard's search buffers. Returns (D, I), (n, k):
    float32 similarities and ids of dtype `ids` (np.int32 halves them; -1 where none found).
    """
    return _by_shards(lambda a, b, kk: search_index(index, X[a:b], kk, database=X), X.shape[0], min(k, index.ntotal), bounds, progress,
                      ids)


def _by_shards(search, n: int, k: int, bounds: list[tuple[int, int]], progress, ids: type) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) (n, k) filled shard by shard from search(a, b, k) -> the rows [a, b)'s (D, I), at
    most REFINE_CHUNK rows per call (a shard's search buffers stay O(chunk x candidates))."""
    D = np.empty((n, k), dtype=np.float32)
    I = np.empty((n, k), dtype=ids)
    for a, b in bounds:
        for c0 in range(a, b, REFINE_CHUNK):
            c1 = min(b, c0 + REFINE_CHUNK)
            D[c0:c1], I[c0:c1] = search(c0, c1, k)
            if progress:
                progress(c1 - c0)
    return D, I


def search_self(
    index: faiss.Index,
    X: np.ndarray,
    k: int,
    bounds: list[tuple[int, int]],
    *,
    first: int = 0,
    database: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
    ids: type = np.int64,
) -> tuple[np.ndarray, np.ndarray]:
    """Self-kNN of rows that `index` holds: row r of X is the index's vector first + r. As
    `search_shards`, except that an HNSW index starts each row's search at the row's own node on
    level 0 (faiss `search_level_0`) instead of descending the upper levels from the global entry
    point: at 10^6 the same recall in 20% less time (BENCHMARKS.md). A quantized index's lists are
    re-scored exactly against `database`, the index's float rows (default X when first is 0)."""
    if not isinstance(index, faiss.IndexHNSW):
        return search_shards(index, X, k, bounds, progress=progress, ids=ids)
    if database is None and first == 0:
        database = X
    refine = quantized(index)
    if refine and database is None:
        raise ValueError("search_self: a quantized index needs its float rows (database) to re-score its lists")
    width = search_width(index, k)

    def from_own_nodes(a: int, b: int, kk: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_f32(X[a:b], "queries")
        entry = np.arange(first + a, first + b, dtype=np.int32).reshape(-1, 1)  # faiss storage_idx_t
        entry_sim = np.einsum("ij,ij->i", q, q).astype(np.float32).reshape(-1, 1)  # the entry's own similarity
        D, I = np.empty((b - a, width), np.float32), np.empty((b - a, width), np.int64)
        index.search_level_0(b - a, faiss.swig_ptr(q), width, faiss.swig_ptr(entry), faiss.swig_ptr(entry_sim), faiss.swig_ptr(D),
                             faiss.swig_ptr(I), 1, 1)
        return refine_exact(q, database, I, kk) if refine else (D, I)

    return _by_shards(from_own_nodes, X.shape[0], min(k, index.ntotal), bounds, progress, ids)


def self_knn(
    X: np.ndarray,
    k: int,
    *,
    spec: IndexSpec = IndexSpec(),
    nshards: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """kNN of every database row against the whole database (index built here), sharded by rows."""
    return search_shards(build_index(X, spec), X, k, shard_bounds(X.shape[0], nshards), progress=progress)


def merge_topk(Ds: list[np.ndarray], Is: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-database-shard top-k lists (ids already global) into one top-k, by similarity."""
    D = np.concatenate(Ds, axis=1)
    I = np.concatenate(Is, axis=1)
    k = min(k, D.shape[1])
    part = np.argpartition(-D, k - 1, axis=1)[:, :k]
    Dp, Ip = np.take_along_axis(D, part, 1), np.take_along_axis(I, part, 1)
    order = np.argsort(-Dp, axis=1, kind="stable")
    return np.take_along_axis(Dp, order, 1), np.take_along_axis(Ip, order, 1)


def recall_at_k(I: np.ndarray, I_ref: np.ndarray) -> float:
    """Mean fraction of the reference top-k ids (rows of I_ref) found in the rows of I."""
    k = I_ref.shape[1]
    hits = sum(np.intersect1d(a, b).size for a, b in zip(I[:, :k], I_ref))
    return hits / float(I_ref.size)
