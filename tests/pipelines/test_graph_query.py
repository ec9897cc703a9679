"""Graph and query stages on imported descriptors: engines and solvers agree with the references."""
import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import GraphConfig, QueryConfig
from pipelines.descriptors import DescriptorError, load_descriptors
from pipelines.graph import load_graph, run_graph
from pipelines.import_descriptors import import_descriptors
from pipelines.query import run_query
from retrieval.graph import build_graph
from retrieval.whitening import l2_normalize


def _write_fvecs(path, X):
    n, d = X.shape
    out = np.empty((n, d + 1), np.float32)
    out[:, 0] = np.array([d], np.int32).view(np.float32)[0]
    out[:, 1:] = X
    out.tofile(path)


@pytest.fixture
def imported(tmp_path, rng):
    X = l2_normalize(rng.normal(size=(700, 16)) + np.repeat(rng.normal(size=(7, 16)) * 2, 100, axis=0))
    Q = l2_normalize(X[::70] + 0.05 * rng.normal(size=(10, 16)))
    np.save(tmp_path / "db.npy", X)
    np.save(tmp_path / "q.npy", Q)
    run = tmp_path / "run"
    import_descriptors(run, tmp_path / "db.npy", queries=tmp_path / "q.npy", shard_size=128)
    return run, X, Q


def test_import_formats_roundtrip(tmp_path, rng):
    import scipy.io as sio

    X = l2_normalize(rng.normal(size=(50, 8)))
    _write_fvecs(tmp_path / "x.fvecs", X)
    sio.savemat(tmp_path / "x.mat", {"vecs": X.T})
    (tmp_path / "keys.txt").write_text("\n".join(f"img{i}.jpg" for i in range(50)))
    for src, kw in [("x.fvecs", {}), ("x.mat", {"transpose": True})]:
        run = tmp_path / src.replace(".", "_")
        import_descriptors(run, tmp_path / src, keys=tmp_path / "keys.txt", shard_size=16, **kw)
        ids, keys, Y = load_descriptors(run / "descriptors")
        np.testing.assert_allclose(Y, X, atol=1e-6)
        assert keys[3] == "img3.jpg" and len(list((run / "descriptors").glob("part-*"))) == 4
    pq.write_table(pq.read_table(tmp_path / "x_fvecs" / "descriptors" / "part-00000.parquet"), tmp_path / "p.parquet")
    import_descriptors(tmp_path / "fromparquet", tmp_path / "p.parquet")
    assert load_descriptors(tmp_path / "fromparquet" / "descriptors")[2].shape == (16, 8)


def test_import_refuses_nan_wrong_dim_and_bad_files(tmp_path, rng):
    X = rng.normal(size=(20, 8)).astype(np.float32)
    X[4, 2] = np.nan
    np.save(tmp_path / "nan.npy", X)
    with pytest.raises(DescriptorError, match=r"1 rows contain NaN/inf \(first rows: \[4\]\)"):
        import_descriptors(tmp_path / "r", tmp_path / "nan.npy")
    np.save(tmp_path / "db.npy", rng.normal(size=(20, 8)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.normal(size=(3, 9)).astype(np.float32))
    with pytest.raises(DescriptorError, match="dimension 9 does not match the database dimension 8"):
        import_descriptors(tmp_path / "r", tmp_path / "db.npy", queries=tmp_path / "q.npy")
    (tmp_path / "bad.fvecs").write_bytes(b"\x05\x00\x00\x00abc")
    with pytest.raises(DescriptorError, match="not a valid .fvecs"):
        import_descriptors(tmp_path / "r", tmp_path / "bad.fvecs")
    (tmp_path / "k.txt").write_text("a\nb\n")
    with pytest.raises(DescriptorError, match="lists 2 keys for 20"):
        import_descriptors(tmp_path / "r", tmp_path / "db.npy", keys=tmp_path / "k.txt")


def test_graph_stage_blocks_equal_in_memory_graph(imported):
    run, X, _ = imported
    man = run_graph(run, GraphConfig(k=10, block_rows=100, shards=3, index="flat"))
    W, gman = load_graph(run / "graph")
    ids, _, Xs = load_descriptors(run / "descriptors")
    Wref, _ = build_graph(Xs, k=10)
    np.testing.assert_allclose(W.toarray(), Wref.toarray(), atol=1e-6)
    assert len(gman["blocks"]) == 7 and gman["nnz"] == Wref.nnz and man["index"] == "flat"


def test_ray_graph_engine_equals_local(imported, ray_session, tmp_path):
    run, _, _ = imported
    run_graph(run, GraphConfig(k=10, shards=4, index="flat", engine="local"))
    W1, _ = load_graph(run / "graph")
    run_graph(run, GraphConfig(k=10, shards=4, index="flat", engine="ray"))
    W2, m2 = load_graph(run / "graph")
    assert m2["engine"] == "ray"
    # same edges; weights to rounding (a Ray worker's BLAS runs one thread, this process's several)
    np.testing.assert_array_equal(W1.indptr, W2.indptr)
    np.testing.assert_array_equal(W1.indices, W2.indices)
    np.testing.assert_allclose(W1.data, W2.data, rtol=1e-5)


def test_approximate_graph_records_recall(imported):
    run, _, _ = imported
    man = run_graph(run, GraphConfig(k=10, index="ivf", nlist=8, nprobe=8, recall_sample=200))
    assert man["index"] == "ivf" and man["recall_at_k"] >= 0.95


def test_every_method_runs_and_solvers_agree(imported):
    run, _, _ = imported
    run_graph(run, GraphConfig(k=10, index="flat", block_rows=256))
    cfg = QueryConfig(methods=["knn", "aqe", "diffusion", "truncated", "spectral"], topk=50, kq=5, alpha=0.9, rtol=1e-8,
                      maxiter=500, truncate_m=700, spectral_rank=699, batch=4)
    stats = run_query(run, run / "queries", cfg)
    ranks = {m: pq.read_table(run / "ranks" / f"{m}.parquet").to_pydict() for m in cfg.methods}
    assert all(len(r["ids"]) == 10 and all(len(x) == 50 for x in r["ids"]) for r in ranks.values())
    d = np.array(ranks["diffusion"]["scores"])
    # truncated over the whole database and full-rank spectral both equal the exact solve
    np.testing.assert_allclose(np.array(ranks["truncated"]["scores"]), d, rtol=1e-5)
    np.testing.assert_allclose(np.array(ranks["spectral"]["scores"]), d, rtol=1e-3, atol=1e-4 * d.max())
    assert stats["diffusion"]["not_converged"] == 0 and all(ranks["diffusion"]["converged"])
    assert (run / "graph" / "spectral-r699-a0.9.npz").is_file()
    # reruns are skipped, and keep the figures of the run that made the ranks
    again = run_query(run, run / "queries", cfg)
    assert all(v["skipped"] is True for v in again.values())
    assert again["diffusion"] == {**stats["diffusion"], "skipped": True} and again["knn"]["seconds"] == stats["knn"]["seconds"]
    assert json.loads((run / "ranks" / "stats.json").read_text())["diffusion"]["iterations_mean"] == stats["diffusion"]["iterations_mean"]


def test_non_convergence_is_reported(imported):
    run, _, _ = imported
    run_graph(run, GraphConfig(k=10, index="flat"))
    stats = run_query(run, run / "queries", QueryConfig(methods=["diffusion"], topk=20, maxiter=2, rtol=1e-12))
    assert stats["diffusion"]["not_converged"] == 10
    assert not any(pq.read_table(run / "ranks" / "diffusion.parquet").column("converged").to_pylist())


def test_hnsw_graph_stage_records_parameters_and_recall(imported):
    run, _, _ = imported
    man = run_graph(run, GraphConfig(k=10, index="hnsw", recall_sample=200))
    assert man["index"] == "hnsw" and man["hnsw"] == {"M": 24, "efConstruction": 48, "efSearch": 64, "storage": "sq8"}
    assert man["recall_at_k"] >= 0.95
    from retrieval.knn import IndexSpec

    assert IndexSpec("auto").resolve(10**6).kind == "hnsw" and IndexSpec("auto").resolve(10**4).kind == "flat"


def test_graph_rows_reader_equals_slices_of_the_whole_graph(imported):
    """What a PETSc rank loads (only the overlapping row blocks) is the same rows of the whole W."""
    from pipelines.graph import read_graph_rows

    run, _, _ = imported
    run_graph(run, GraphConfig(k=8, block_rows=128, index="flat"))
    W, _ = load_graph(run / "graph")
    for r0, r1 in ((0, 700), (100, 300), (127, 129), (650, 700), (5, 5)):
        part = read_graph_rows(run / "graph", r0, r1)
        assert part.shape == (r1 - r0, 700) and (part != W[r0:r1]).nnz == 0


def test_rankers_are_built_once_and_answer_like_the_query_stage(imported):
    from pipelines.rankers import Rankers

    run, X, Q = imported
    run_graph(run, GraphConfig(k=8, index="flat"))
    cfg = QueryConfig(methods=["knn", "aqe", "diffusion", "truncated", "spectral"], topk=50, spectral_rank=20, truncate_m=200)
    run_query(run, run / "queries", cfg)
    rankers = Rankers(X, cfg, graph_dir=run / "graph")
    for m in cfg.methods:
        stage = pq.read_table(run / "ranks" / f"{m}.parquet").to_pydict()
        r = rankers.rank(m, Q, 50)
        np.testing.assert_array_equal(r.ids, np.array(stage["ids"]))  # import ids are the rows 0..n-1
        assert rankers.get(m) is rankers.get(m)
    assert (run / "graph" / "spectral-r20-a0.99.npz").is_file()  # the embedding is cached beside the graph


def test_graph_of_a_grown_collection_is_updated_and_equals_a_rebuild(tmp_path, caplog):
    """Issue 13: appended descriptors (earlier rows unchanged) update the saved kNN lists instead
    of searching everything again; the graph equals one built from scratch."""
    import logging

    from pipelines.config import GraphConfig
    from pipelines.descriptors import write_descriptors
    from pipelines.graph import load_graph, run_graph
    from pipelines.shards import write_json
    from retrieval.whitening import l2_normalize

    X = l2_normalize(np.random.default_rng(5).normal(size=(700, 16))).astype(np.float32)

    def run_with(folder, n_rows, parts):
        (folder / "descriptors").mkdir(parents=True, exist_ok=True)
        for i, (a, b) in enumerate(parts):
            write_descriptors(folder / "descriptors" / f"part-{i:05d}.parquet", np.arange(a, b), [f"k{j}" for j in range(a, b)], X[a:b],
                              params=str(i))
        write_json({"n": n_rows, "descriptors_sha256_16": f"h{n_rows}"}, folder / "manifest.json")

    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    cfg = GraphConfig(k=8, index="flat", block_rows=100)
    run_with(grown, 600, [(0, 300), (300, 600)])
    run_graph(grown, cfg)
    run_with(grown, 700, [(0, 300), (300, 600), (600, 700)])
    with caplog.at_level(logging.INFO, logger="pipelines.graph"):
        man = run_graph(grown, cfg)
    assert "grew from 600 to 700 rows" in caplog.text and man["updated_from_rows"] == 600
    run_with(fresh, 700, [(0, 300), (300, 600), (600, 700)])
    run_graph(fresh, cfg)
    (Wg, _), (Wf, _) = load_graph(grown / "graph"), load_graph(fresh / "graph")
    # the same edges, weights to the rounding of one dot product (the update's compiled product and
    # faiss's BLAS sum in different orders; on some CPUs their bits agree, on others not)
    assert Wg.nnz > 0
    np.testing.assert_array_equal(Wg.indptr, Wf.indptr)
    np.testing.assert_array_equal(Wg.indices, Wf.indices)
    np.testing.assert_allclose(Wg.data, Wf.data, rtol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.graph"):  # other settings: built again, not updated
        assert "updated_from_rows" not in run_graph(grown, GraphConfig(k=6, index="flat", block_rows=100))


@pytest.mark.parametrize("storage", ["float", "sq8"])
def test_approximate_graph_of_a_grown_collection_is_updated_through_its_kept_index(tmp_path, caplog, storage):
    """Issue 13, approximate index: a grown collection adds its new rows to the HNSW index kept
    with the graph, searches them there and merges the old lists with their reverse neighbours;
    the recall of the updated lists is measured like a build's and stays close to it, the kept
    index grows with the graph (for the next update and for the seeds of new queries), and a
    missing kept index means a rebuild, not a failure. A quantized index (sq8) the same, its
    lists' similarities the exact ones (re-scored on the rows read back from a scratch file, gone
    afterwards)."""
    from pipelines.config import GraphConfig
    from pipelines.descriptors import write_descriptors
    from pipelines.graph import SEARCH_INDEX, SEARCH_INDEX_META, run_graph
    from pipelines.shards import read_json, write_json
    from retrieval.synthetic_manifold import ManifoldSpec, make_manifold_dataset

    X = make_manifold_dataset(ManifoldSpec(n=3000, n_queries=1, shared_dim=16, seed=2))[0].astype(np.float32)
    run = tmp_path / "run"

    def grow_to(n_rows, a):  # a part with rows a .. n_rows - 1
        (run / "descriptors").mkdir(parents=True, exist_ok=True)
        write_descriptors(run / "descriptors" / f"part-{a:05d}.parquet", np.arange(a, n_rows), [f"k{j}" for j in range(a, n_rows)], X[a:n_rows],
                          params=str(a))
        write_json({"n": n_rows, "descriptors_sha256_16": f"h{n_rows}"}, run / "manifest.json")

    cfg = GraphConfig(k=10, index="hnsw", hnsw_m=16, ef_construction=40, ef_search=64, recall_sample=300, hnsw_storage=storage)
    grow_to(2000, 0)
    built = run_graph(run, cfg)
    (run / "graph" / "rows.tmp.npy").write_bytes(b"scratch rows left by a killed search")
    assert run_graph(run, cfg)["params"] == built["params"] and not (run / "graph" / "rows.tmp.npy").exists()  # skipped, leftover gone
    grow_to(3000, 2000)
    with caplog.at_level(logging.INFO, logger="pipelines.graph"):
        man = run_graph(run, cfg)
    assert "grew from 2000 to 3000 rows" in caplog.text and man["updated_from_rows"] == 2000 and man["n"] == 3000
    assert built["rows_on_disk"] == man["rows_on_disk"] == (storage == "sq8") and not (run / "graph" / "rows.tmp.npy").exists()
    assert man["recall_at_k"] > 0.9 and man["recall_at_k"] > built["recall_at_k"] - 0.05, (man["recall_at_k"], built["recall_at_k"])
    meta = read_json(run / "graph" / SEARCH_INDEX_META)
    assert meta["n"] == 3000 and meta["graph"] == man["params"] and man["hnsw"]["storage"] == storage
    with np.load(run / "graph" / "knn.npz") as z:  # exact similarities, old lists and new
        np.testing.assert_allclose(z["D"], np.einsum("id,ikd->ik", X, X[z["I"]]), rtol=1e-5, atol=1e-6)
    (run / "graph" / SEARCH_INDEX).unlink()  # no kept index: the next growth is a build
    X = np.vstack([X, X[:50] * 0.5 + X[50:100] * 0.5])
    X[3000:] /= np.linalg.norm(X[3000:], axis=1, keepdims=True)
    grow_to(3050, 3000)
    assert "updated_from_rows" not in run_graph(run, cfg)


def test_damaged_saved_lists_mean_a_rebuild_not_a_failure(tmp_path, caplog):
    """A knn.npz that cannot be read (garbage, or a data member whose CRC fails only when read in
    full, after the kept HNSW index has already grown and the loaded rows were dropped) makes the
    grown collection's graph a build, with a one-line warning; the result equals a fresh build."""
    from pipelines.config import GraphConfig
    from pipelines.descriptors import write_descriptors
    from pipelines.graph import load_graph, run_graph
    from pipelines.shards import write_json

    X = l2_normalize(np.random.default_rng(8).normal(size=(900, 12))).astype(np.float32)
    cfg = GraphConfig(k=6, index="hnsw", hnsw_m=8, ef_construction=40, ef_search=40, recall_sample=50)

    def grow(run, n_rows, parts):
        (run / "descriptors").mkdir(parents=True, exist_ok=True)
        for a, b in parts:
            write_descriptors(run / "descriptors" / f"part-{a:05d}.parquet", np.arange(a, b), [f"k{j}" for j in range(a, b)], X[a:b],
                              params=str(a))
        write_json({"n": n_rows, "descriptors_sha256_16": f"h{n_rows}"}, run / "manifest.json")

    for damage in ("garbage", "crc"):
        run = tmp_path / damage
        grow(run, 600, [(0, 600)])
        run_graph(run, cfg)
        knn = run / "graph" / "knn.npz"
        if damage == "garbage":
            knn.write_bytes(b"PK\x03\x04 not a zip")
        else:
            raw = bytearray(knn.read_bytes())
            raw[len(raw) // 3] ^= 0xFF  # inside the similarities' data, past every header
            knn.write_bytes(bytes(raw))
        grow(run, 700, [(0, 600), (600, 700)])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines.graph"):
            man = run_graph(run, cfg)
        assert "updated_from_rows" not in man and man["n"] == 700
        assert "saved kNN lists" in caplog.text and "unreadable" in caplog.text
        assert load_graph(run / "graph")[0].shape == (700, 700)


def test_graph_keeps_its_approximate_index_and_new_queries_seed_from_it(imported, caplog):
    """Issue 15: the graph stage's HNSW index is kept beside the graph (for that graph only) and
    `seed_search = "index"` seeds the graph methods from it, with rankings that match the exact
    seeds where the index finds the same neighbours; a flat graph gets one built once and kept;
    a rebuilt graph drops the index of the graph before."""
    import logging

    from pipelines.graph import SEARCH_INDEX, SEARCH_INDEX_META
    from pipelines.rankers import Rankers

    run, X, Q = imported
    gdir = run / "graph"
    man = run_graph(run, GraphConfig(k=10, index="hnsw", recall_sample=0, hnsw_storage="float"))  # float rows: shared below
    meta = json.loads((gdir / SEARCH_INDEX_META).read_text())
    assert meta["graph"] == man["params"] and meta["n"] == 700 and meta["kind"] == "hnsw" and (gdir / SEARCH_INDEX).is_file()
    stamp = (gdir / SEARCH_INDEX).stat().st_mtime_ns
    common = dict(topk=50, kq=5, truncate_m=100, truncate_hops=4)
    exact = Rankers(X, QueryConfig(**common, seed_search="exact"), graph_dir=gdir)
    approx = Rankers(X, QueryConfig(**common, seed_search="index", seed_effort=200), graph_dir=gdir)
    auto = Rankers(X, QueryConfig(**common, seed_effort=200), graph_dir=gdir)  # "auto": the kept index, as it exists
    auto.get("diffusion")
    assert auto.knn.seed_index is not None and auto.knn.seed_index.ntotal == 700
    for method in ("diffusion", "truncated", "spectral"):
        a, e = approx.rank(method, Q, 50), exact.rank(method, Q, 50)
        np.testing.assert_array_equal(a.ids, e.ids)  # 700 rows at efSearch 200: the same seeds
    assert approx.knn.seed_index is not None and exact.knn.seed_index is None
    assert (gdir / SEARCH_INDEX).stat().st_mtime_ns == stamp  # loaded, not built again
    # the rows are held once: the rankers read the index's copy of them (10^7: 5.1 GB less)
    from retrieval.knn import stored_vectors

    assert np.shares_memory(approx.X, stored_vectors(approx.knn.seed_index)) and approx.knn.X is approx.X
    other = X.copy()
    other[0] += 1e-3  # not the rows the index holds: both kept
    differ = Rankers(other, QueryConfig(**common, seed_search="index", seed_effort=200), graph_dir=gdir)
    differ.get("truncated")
    assert not np.shares_memory(differ.X, stored_vectors(differ.knn.seed_index)) and differ.X[0, 0] == other[0, 0]
    # the seeds really come from the index: a fault in it shows in the rankings
    approx.knn.seed_index.reset()
    with pytest.raises(ValueError, match="seed index has 0 rows"):
        approx.rank("truncated", Q, 50)

    run_graph(run, GraphConfig(k=10, index="flat"))  # a new graph: the old index is of no use to it
    assert not (gdir / SEARCH_INDEX).exists() and not (gdir / SEARCH_INDEX_META).exists()
    auto = Rankers(X, QueryConfig(**common), graph_dir=gdir)
    auto.get("truncated")
    assert auto.knn.seed_index is None and not (gdir / SEARCH_INDEX).exists()  # "auto" on an exact graph: exact seeds, nothing built
    with caplog.at_level(logging.INFO, logger="pipelines.graph"):
        stats = run_query(run, run / "queries", QueryConfig(methods=["truncated"], **common, seed_search="index"))
    assert "built a hnsw index over 700 rows" in caplog.text and stats["truncated"]["queries"] == 10
    assert json.loads((gdir / SEARCH_INDEX_META).read_text())["graph"] == json.loads((gdir / "manifest.json").read_text())["params"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.graph"):
        Rankers(X, QueryConfig(**common, seed_search="index"), graph_dir=gdir).get("truncated")
    assert "built a hnsw" not in caplog.text  # kept from the query before
    # a damaged kept index is a warning and a cache miss: "auto" seeds exactly, "index" builds it again
    (gdir / SEARCH_INDEX).write_bytes(b"not a faiss index")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.graph"):
        auto = Rankers(X, QueryConfig(**common), graph_dir=gdir)
        auto.get("truncated")
        assert auto.knn.seed_index is None and "unreadable" in caplog.text
        again = Rankers(X, QueryConfig(**common, seed_search="index"), graph_dir=gdir)
        again.get("truncated")
    assert again.knn.seed_index.ntotal == 700 and "built a hnsw index over 700 rows" in caplog.text


@pytest.mark.parametrize("storage", ["float", "sq8"])
def test_graph_stage_holds_the_rows_once(tmp_path, monkeypatch, storage):
    """Issue 15 (offline memory): given a loader, the graph build drops the loaded rows once an
    index holds them, and builds the same graph as from rows held in memory: an HNSW-flat index's
    own copy serves as the queries; a quantized index's lists are re-scored on the rows read back
    from a scratch file a block at a time (gone once the search is done)."""
    import gc
    import weakref

    import pipelines.graph as pg

    class Rows(np.ndarray):  # an ndarray that can be watched with a weak reference
        pass

    X = l2_normalize(np.random.default_rng(2).normal(size=(600, 16))).astype(np.float32)
    refs = []

    def load():
        rows = X.copy().view(Rows)
        refs.append(weakref.ref(rows))
        return rows

    seen = {}
    real = pg.save_search_index

    def spy(folder, index, spec, params):  # called once the search is done, the index still alive
        gc.collect()
        seen["loaded rows alive"] = refs[0]() is not None
        seen["rows on disk"] = (folder / pg.ROWS_SCRATCH).is_file()
        real(folder, index, spec, params)

    monkeypatch.setattr(pg, "save_search_index", spy)
    cfg = GraphConfig(k=8, index="hnsw", recall_sample=100, hnsw_storage=storage)
    W, stats, info = pg.build_graph_sharded(load, cfg, gdir=tmp_path / "g", params="p")
    assert seen == {"loaded rows alive": False, "rows on disk": storage == "sq8"} and info["recall_at_k"] >= 0.95
    assert info["rows_on_disk"] == (storage == "sq8") and not (tmp_path / "g" / pg.ROWS_SCRATCH).exists()
    W_ref, _, _ = pg.build_graph_sharded(X, cfg)
    assert (W != W_ref).nnz == 0 and W.nnz > 0
    with np.load(tmp_path / "g" / "knn.npz") as z:
        assert z["I"].dtype == np.int32 and int(z["rows"]) == 600


def test_partition_row_order_is_kept_with_the_graph_and_ranks_like_rcm(imported, monkeypatch, caplog):
    """The exact solve ranks the same in METIS-partition order as in RCM order; the partition order is
    computed once per graph and kept beside it, a damaged or outdated one is computed again."""
    import retrieval.partition_order as po
    from pipelines.rankers import Rankers, row_order_cached

    monkeypatch.setattr(po, "ROWS_PER_PART", 100)  # 7 parts of the 700-node test graph
    run, X, Q = imported
    run_graph(run, GraphConfig(k=10, index="flat"))
    gdir = run / "graph"
    common = dict(methods=["diffusion"], topk=50, kq=5, rtol=1e-8, maxiter=500)
    by = {o: Rankers(X, QueryConfig(**common, order=o), graph_dir=gdir).rank("diffusion", Q, 50) for o in ("rcm", "partition")}
    np.testing.assert_array_equal(by["partition"].ids, by["rcm"].ids)
    W, _ = load_graph(gdir)
    kept = gdir / "order-partition.npz"
    assert kept.is_file()
    perm = row_order_cached(W, gdir, "partition")
    np.testing.assert_array_equal(perm, po.partition_order(W))
    assert not np.array_equal(perm, po.rcm_order(W))  # really the partition, not the RCM fallback

    def fail(*a, **k):
        raise AssertionError("recomputed")

    with monkeypatch.context() as m:
        m.setattr(po, "partition_order", fail)
        np.testing.assert_array_equal(row_order_cached(W, gdir, "partition"), perm)  # read back, not recomputed
    kept.write_bytes(b"damaged")
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(row_order_cached(W, gdir, "partition"), perm)
    assert "unreadable" in caplog.text
    man = json.loads((gdir / "manifest.json").read_text())
    (gdir / "manifest.json").write_text(json.dumps({**man, "nnz": man["nnz"] + 1}))  # another graph: its own order
    calls = []
    monkeypatch.setattr(po, "partition_order", lambda A: calls.append(1) or perm)
    row_order_cached(W, gdir, "partition")
    assert calls == [1]


def test_precomputed_rows_are_kept_with_the_graph(imported, monkeypatch, caplog):
    """The "precomputed" method through the query stage: its rows are computed once per graph and
    settings, written to graph/ as they are solved and memory-mapped when read (read back, not
    recomputed; a damaged file or other settings are computed again); with rows as deep as the
    truncated solve's subgraph it ranks like truncated diffusion on the top of each list."""
    import retrieval.precomputed as rp
    from pipelines.rankers import precomputed_cached

    run, X, Q = imported
    run_graph(run, GraphConfig(k=10, index="flat"))
    cfg = QueryConfig(methods=["truncated", "precomputed"], topk=20, kq=5, rtol=1e-8, truncate_m=150, truncate_hops=8,
                      precompute_keep=150)
    run_query(run, run / "queries", cfg)
    kept = list((run / "graph").glob("precomputed-*.json"))
    assert len(kept) == 1
    ranks = {m: pq.read_table(run / "ranks" / f"{m}.parquet").to_pydict()["ids"] for m in ("truncated", "precomputed")}
    assert np.mean([len(set(a[:5]) & set(b[:5])) / 5 for a, b in zip(ranks["truncated"], ranks["precomputed"])]) >= 0.9
    W, _ = load_graph(run / "graph")
    in_memory = precomputed_cached(W, None, cfg)  # no folder: computed in memory, the same rows
    with monkeypatch.context() as m:
        m.setattr(rp, "item_row_chunks", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
        rows = precomputed_cached(W, run / "graph", cfg)
    assert isinstance(rows.data.base, np.memmap)  # mapped, not loaded
    for a in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(rows, a), getattr(in_memory, a))
    values = kept[0].with_suffix(".values")
    values.write_bytes(values.read_bytes()[:-4])  # damaged: a value short
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(precomputed_cached(W, run / "graph", cfg).data, in_memory.data)
    assert "unreadable" in caplog.text
    other = precomputed_cached(W, run / "graph", QueryConfig(**{**cfg.__dict__, "precompute_keep": 20}))
    assert np.diff(other.indptr).max() == 20 and len(list((run / "graph").glob("precomputed-*.json"))) == 2


def test_spectral_embedding_is_recomputed_for_a_grown_graph(imported, monkeypatch):
    """The stored spectral embedding is keyed by the graph's parameters, nodes and edges: a graph
    grown by an update (same parameters, more edges) gets a new one, the same graph reads it back."""
    import pipelines.rankers as pr

    run, X, Q = imported
    run_graph(run, GraphConfig(k=10, index="flat"))
    gdir = run / "graph"
    W, _ = load_graph(gdir)
    emb = pr.spectral_cached(W, gdir, rank=8, alpha=0.9)
    calls = []
    real = pr.spectral_embedding
    monkeypatch.setattr(pr, "spectral_embedding", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_array_equal(pr.spectral_cached(W, gdir, rank=8, alpha=0.9).V, emb.V)
    assert calls == []
    man = json.loads((gdir / "manifest.json").read_text())
    (gdir / "manifest.json").write_text(json.dumps({**man, "nnz": man["nnz"] + 2}))
    pr.spectral_cached(W, gdir, rank=8, alpha=0.9)
    assert calls == [1]
