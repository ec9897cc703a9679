"""Batch query job: a Parquet file of (possibly millions of) queries -> ranked shards, in chunks.

Input columns: `key` (string, required) and optionally `vector` (list<float>, descriptors in the
database's whitened space) or `image` (binary, encoded image). Without `vector`/`image`, each `key`
names a database image whose descriptor is the query.

Each chunk of `chunk` rows goes through the index's rankers (the service's and the query stage's
code path) and is written atomically as `<out>/<method>/part-NNNNN.parquet` (`row`, `query`, `ids`,
`scores`, solver stats), with invalid rows in `<out>/<method>/rejects/part-NNNNN.parquet` (`row`,
`key`, `reason`). A chunk whose output exists with the same parameters is skipped, so a killed job
resumes where it stopped. `<out>/<method>/stats.json` records the throughput.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from retrieval.rankers import Ranking

from .config import params_hash
from .query import ranks_table
from .service import SERVICE_METHODS, QueryIndex, unit_vector
from .shards import read_json, shard_done, write_json, write_table

log = logging.getLogger(__name__)


def _chunk_queries(index: QueryIndex, t: pa.Table, row0: int) -> tuple[np.ndarray, list[str], np.ndarray, list[tuple[int, str, str]]]:
    """Table chunk -> (Q (m, d) float32 of the valid rows, their keys, their input row numbers, rejects)."""
    keys = t.column("key").to_pylist()
    n, d = len(keys), index.dim
    ok = np.ones(n, bool)
    reasons: dict[int, str] = {}
    Q = np.zeros((n, d), np.float32)
    if "vector" in t.column_names:
        col = t.column("vector").combine_chunks()
        for i, v in enumerate(col.to_pylist()):
            if v is None or len(v) != d:
                reasons[i] = f"vector must have {d} values, got {None if v is None else len(v)}"
                continue
            try:
                Q[i] = unit_vector(v)
            except ValueError as e:
                reasons[i] = f"vector {e}"
    elif "image" in t.column_names:
        imgs = t.column("image").to_pylist()
        good = []
        from .ingest import validate_image

        for i, data in enumerate(imgs):
            try:
                validate_image(data or b"", max_pixels=index.limits.max_image_pixels)
                good.append(i)
            except ValueError as e:
                reasons[i] = f"image: {e}"
        if good:
            Q[good] = index.embed_images([imgs[i] for i in good])
    else:
        for i, k in enumerate(keys):
            r = index.row_of_key.get(k)
            if r is None:
                reasons[i] = f"unknown database key {k!r}"
            else:
                Q[i] = index.X[r]
    for i in reasons:
        ok[i] = False
    sel = np.flatnonzero(ok)
    rejects = [(row0 + i, str(keys[i]), reasons[i]) for i in sorted(reasons)]
    return Q[sel], [str(keys[i]) for i in sel], row0 + sel, rejects


def run_batch_query(index: QueryIndex, queries: str | Path, out: str | Path, *, methods: list[str], topk: int = 100,
                    chunk: int = 4096) -> dict:
    """Rank every row of the `queries` Parquet file with each method; returns per-method stats."""
    queries, out = Path(queries), Path(out)
    for m in methods:
        if m not in SERVICE_METHODS:
            raise ValueError(f"batch query: unknown method {m!r}; expected one of {sorted(SERVICE_METHODS)}")
    if chunk < 1 or topk < 1:
        raise ValueError("batch query: chunk and topk must be positive")
    pf = pq.ParquetFile(queries)
    names = pf.schema_arrow.names
    if "key" not in names:
        raise ValueError(f"batch query: {queries} has no `key` column (columns: {names})")
    columns = ["key"] + [c for c in ("vector", "image") if c in names][:1]
    nrows = pf.metadata.num_rows
    index_id = {"descriptors": read_json(index.run_dir / "manifest.json").get("descriptors_sha256_16")
                if (index.run_dir / "manifest.json").is_file() else None,
                "graph": read_json(index.run_dir / "graph" / "manifest.json").get("params")
                if (index.run_dir / "graph" / "manifest.json").is_file() else None}
    source = {"file": str(queries.resolve()), "bytes": queries.stat().st_size, "rows": nrows, "columns": columns, "chunk": chunk}
    summary = {}
    for m in methods:
        mdir = out / m
        phash = params_hash({"source": source, "index": index_id, "method": m, "topk": topk, "query": index.query_cfg})
        done = ranked = rejected = 0
        t_rank = 0.0
        t0 = time.perf_counter()
        with tqdm(total=nrows, desc=f"batch query {m}", unit="q") as bar:
            for c, batch in enumerate(pf.iter_batches(batch_size=chunk, columns=columns)):
                row0 = c * chunk
                path = mdir / f"part-{c:05d}.parquet"
                if shard_done(path, params=phash):
                    done += 1
                    bar.update(batch.num_rows)
                    continue
                Q, keys, rows, rejects = _chunk_queries(index, pa.Table.from_batches([batch]), row0)
                rej = pa.table({"row": pa.array([r[0] for r in rejects], pa.int64()), "key": pa.array([r[1] for r in rejects], pa.string()),
                                "reason": pa.array([r[2] for r in rejects], pa.string())})
                write_table(rej, mdir / "rejects" / f"part-{c:05d}.parquet", params=phash)
                ts = time.perf_counter()
                if len(keys):
                    ranking = index.rank(Q, m, topk)
                else:
                    k = min(topk, index.X.shape[0])
                    ranking = Ranking(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
                t_rank += time.perf_counter() - ts
                table = ranks_table(keys, ranking, index.ids)
                table = table.add_column(0, "row", pa.array(rows.astype(np.int64)))
                write_table(table, path, params=phash)
                ranked += len(keys)
                rejected += len(rejects)
                bar.update(batch.num_rows)
        wall = time.perf_counter() - t0
        info = {"rows": nrows, "chunks_skipped": done, "ranked": ranked, "rejected": rejected, "seconds": round(wall, 3),
                "rank_seconds": round(t_rank, 3), "queries_per_s": round(ranked / wall, 1) if ranked and wall > 0 else None}
        write_json(info, mdir / "stats.json")
        log.info("batch query: %s: %d ranked, %d rejected, %d chunks skipped, %.1f q/s", m, ranked, rejected, done,
                 info["queries_per_s"] or 0)
        summary[m] = info
    return summary
