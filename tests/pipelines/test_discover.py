"""Object discovery (pooling = "os_egm") and regional diffusion through the whole pipeline."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.descriptors import load_descriptors
from pipelines.run import run_stages
from tests.conftest import tiny_run_config

STAGES = ["ingest", "extract", "graph", "query", "evaluate"]


def _os_cfg(tmp_path, tiny_benchmark, name, engine="local"):
    out = tmp_path / name
    out.mkdir()
    shutil.copytree(tiny_benchmark, out / "benchmark")
    cfg = tiny_run_config(out, engine=engine)
    cfg.extract = dataclasses.replace(cfg.extract, pooling="os_egm")
    cfg.query.methods = ["knn", "diffusion", "regional"]
    return cfg


@pytest.fixture(scope="module")
def os_run(tmp_path_factory, tiny_benchmark):
    cfg = _os_cfg(tmp_path_factory.mktemp("os"), tiny_benchmark, "local")
    return cfg, run_stages(cfg, STAGES)


def test_os_egm_run_writes_both_passes_the_region_index_and_every_method(os_run):
    cfg, res = os_run
    out = Path(cfg.out)
    assert json.loads((out / "manifest.json").read_text())["pooling"] == "os_egm"
    fs_ids, _, FS = load_descriptors(out / "features")  # first pass: FS.EGM, with regions
    os_ids, _, OS = load_descriptors(out / "os_features")
    np.testing.assert_array_equal(fs_ids, os_ids)
    assert "regions" in pq.read_schema(sorted((out / "features").glob("part-*.parquet"))[0]).names
    cos = np.sum(FS * OS, axis=1) / (np.linalg.norm(FS, axis=1) * np.linalg.norm(OS, axis=1))
    assert (cos < 0.999).sum() >= len(cos) // 4  # the OS map re-detects regions: descriptors move (3x3 maps here: not all)
    man = json.loads((out / "regions" / "manifest.json").read_text())
    assert man["images"] == len(fs_ids) and man["regions"] >= len(fs_ids) and man["kind"] == "fs_egm"
    assert np.load(out / "regions" / "centrality.npz")["g"].shape == (man["regions"],)
    rec = json.loads((out / "extract.json").read_text())  # both passes timed (the experiment's extraction rates)
    assert rec["images"] == rec["os"]["images"] == len(fs_ids) and rec["os"]["seconds"] > 0 and rec["regions_s"] > 0
    assert set(json.loads((out / "metrics.json").read_text())) == {"knn", "diffusion", "regional"}
    t = pq.read_table(out / "ranks" / "regional.parquet")
    assert t.num_rows == len(load_descriptors(out / "queries" / "descriptors")[0])
    assert sorted(t.column("ids")[0].as_py()) == sorted(fs_ids.tolist())  # a full ranking of the database
    html = (out / "report.html").read_text()
    assert "FS and OS saliency" in html and html.count("data:image/jpeg;base64") >= 3 * cfg.evaluate.report_queries


def test_os_egm_crash_resumes_and_ray_equals_in_process(os_run, ray_session, tmp_path, tiny_benchmark, monkeypatch):
    import pipelines.extract as ex

    ref_cfg, _ = os_run
    ref = Path(ref_cfg.out)
    cfg = _os_cfg(tmp_path, tiny_benchmark, "ray", engine="ray")
    run_stages(cfg, ["ingest"])
    real = ex.write_descriptors
    n = {"calls": 0}
    shards = len(list((Path(cfg.out) / "images").glob("part-*.parquet")))

    def crash_in_second_pass(*a, **k):  # first pass: one call per shard; then the OS pass
        n["calls"] += 1
        if n["calls"] == shards + 2:
            raise RuntimeError("injected crash")
        return real(*a, **k)

    monkeypatch.setattr(ex, "write_descriptors", crash_in_second_pass)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_stages(cfg, ["extract"])
    monkeypatch.setattr(ex, "write_descriptors", real)
    out = Path(cfg.out)
    assert len(list((out / "os_features").glob("part-*.parquet"))) == 1
    res = run_stages(cfg, ["extract"])
    assert res["extract"]["database"]["images"] == 0  # the first pass was complete
    assert res["extract"]["database"]["os"]["images"] < sum(pq.read_metadata(p).num_rows for p in (out / "images").glob("*.parquet"))
    for sub in ("features", "os_features", "descriptors", "queries/os_features"):
        a, b = load_descriptors(ref / sub), load_descriptors(out / sub)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[2], b[2], atol=1e-5, err_msg=sub)  # Ray actors == in-process


def test_regional_vectors_round_trip_through_a_shard_column_wise(tmp_path, rng):
    from pipelines.descriptors import write_descriptors
    from pipelines.regions import _shard_regions, load_regions

    regs = [rng.normal(size=(r, 6)).astype(np.float32) for r in (3, 0, 1, 5)]
    boxes = [rng.uniform(0, 9, size=(len(r), 4)).astype(np.float32) for r in regs]
    ids = np.array([4, 5, 7, 9])
    write_descriptors(tmp_path / "features" / "part-00000.parquet", ids, list("abcd"), rng.normal(size=(4, 6)), params="p",
                      regions={"regions": regs, "region_boxes": boxes})
    t = pq.read_table(tmp_path / "features" / "part-00000.parquet")
    assert t.column("regions").to_pylist()[0] == regs[0].tolist()  # the same layout as a per-row conversion
    sid, counts, R = _shard_regions(tmp_path / "features" / "part-00000.parquet")
    np.testing.assert_array_equal(sid, ids)
    np.testing.assert_array_equal(counts, [3, 0, 1, 5])
    np.testing.assert_array_equal(R, np.concatenate(regs))
    got_ids, got = load_regions(tmp_path, np.array([9, 4]))
    np.testing.assert_array_equal(got[0], regs[3])
    np.testing.assert_array_equal(got[1], regs[0])


def test_os_local_search_is_truncated_past_the_exact_limit_and_equal_where_it_covers_the_graph(os_run, monkeypatch):
    """`[extract].os_solver`: "auto" solves each image's local search exactly on small region graphs
    and by truncated diffusion past `OS_EXACT_MAX` nodes (the exact solve costs the whole graph per
    batch); on a region graph smaller than the truncated subgraph both give the same scores."""
    import pipelines.discover as discover

    cfg, _ = os_run
    out = Path(cfg.out)
    exact = discover.ObjectSaliencyExtractor(cfg.extract, out, own=True)
    assert type(exact.solver).__name__ == "DiffusionRanker"
    n = len(exact.rknn.X)
    assert n < 2000  # the truncated subgraph (m = 2000) covers the whole toy region graph
    monkeypatch.setattr(discover, "OS_EXACT_MAX", n - 1)
    auto = discover.ObjectSaliencyExtractor(cfg.extract, out, own=True)
    forced = discover.ObjectSaliencyExtractor(dataclasses.replace(cfg.extract, os_solver="truncated"), out, own=True)
    assert type(auto.solver).__name__ == type(forced.solver).__name__ == "TruncatedScores"
    D, I = exact.rknn.search(exact.rknn.X[:4], 5)
    S_exact, _ = exact.solver.solve(D, I)
    S_trunc, st = auto.solver.solve(D, I)
    assert st.converged.all()
    np.testing.assert_allclose(S_trunc, S_exact, rtol=1e-3, atol=1e-5 * np.abs(S_exact).max())
    # a solver set by hand keys the OS shards (they are redone); PETSc's is the exact solve; "auto" keeps its key
    from pipelines.extract import feature_params

    features = feature_params(discover.first_pass(cfg.extract))
    key = {s: discover.os_pass(out, out, dataclasses.replace(cfg.extract, os_solver=s), cfg.graph, features=features)[1]
           for s in ("auto", "exact", "truncated", "petsc")}
    assert key["petsc"] == key["exact"] and len({key["auto"], key["exact"], key["truncated"]}) == 3


@pytest.mark.mpi
def test_os_solves_on_petsc_ranks_equal_the_in_process_ones(os_run, tmp_path):
    """`[extract].os_solver = "petsc"`: Katz centrality and the local search of the OS maps solved on
    MPI ranks that read the stored region graph, equal to the in-process block CG."""
    from pipelines.discover import ObjectSaliencyExtractor, centrality

    cfg, _ = os_run
    out = Path(cfg.out)
    run = tmp_path / "run"
    shutil.copytree(out / "regions", run / "regions")
    (run / "regions" / "centrality.npz").unlink()  # solved again, on the ranks
    petsc = dataclasses.replace(cfg.extract, os_solver="petsc")
    g = centrality(run, petsc)
    np.testing.assert_allclose(g, np.load(out / "regions" / "centrality.npz")["g"], rtol=1e-4)
    local, ranks = ObjectSaliencyExtractor(cfg.extract, run, own=True), ObjectSaliencyExtractor(petsc, run, own=True)
    assert type(ranks.solver).__name__ == "PetscScores"
    D, I = local.rknn.search(np.load(run / "regions" / "vectors.npy")[:4], 5)  # four regions' own neighbourhoods as seeds
    S_local, _ = local.solver.solve(D, I)
    S_ranks, st = ranks.solver.solve(D, I)
    assert st.converged.all()
    np.testing.assert_allclose(S_ranks, S_local, rtol=1e-4, atol=1e-6 * np.abs(S_local).max())


def test_adding_images_grows_the_region_index_and_forwards_only_the_new_ones(tmp_path, tiny_benchmark):
    from pipelines.distractors import write_synthetic
    from pipelines.graph import build_graph_sharded, load_graph
    from pipelines.ingest import ingest_added

    cfg = _os_cfg(tmp_path, tiny_benchmark, "grow")
    run_stages(cfg, ["ingest", "extract"])
    out, rdir = Path(cfg.out), Path(cfg.out) / "regions"
    man0 = json.loads((rdir / "manifest.json").read_text())
    V0, white0 = np.load(rdir / "vectors.npy"), (rdir / "whitening.npz").read_bytes()
    os0 = {p.name: p.stat().st_mtime_ns for p in (out / "os_features").glob("part-*.parquet")}
    write_synthetic(tmp_path / "new", 0, 5, seed=2, size=64)
    ingest_added(tmp_path / "new", cfg.out, cfg.ingest)
    run_stages(cfg, ["extract"])
    man = json.loads((rdir / "manifest.json").read_text())
    assert man["grown_from_images"] == man0["images"] and man["images"] == man0["images"] + 5
    assert man["lineage"] == man0["lineage"] != man["params"]
    V = np.load(rdir / "vectors.npy")
    np.testing.assert_array_equal(V[: len(V0)], V0)  # earlier regions unchanged: the regional whitening was reused
    assert (rdir / "whitening.npz").read_bytes() == white0 and len(V) == man["regions"] > len(V0)
    W, _ = load_graph(rdir / "graph")  # updated, and equal to a graph built from scratch on the same vectors
    ref, _, _ = build_graph_sharded(V, cfg.graph)
    assert json.loads((rdir / "graph" / "manifest.json").read_text())["updated_from_rows"] == len(V0)
    np.testing.assert_allclose(W.toarray(), ref.toarray(), atol=1e-6)
    assert np.load(rdir / "centrality.npz")["g"].shape == (len(V),)
    os1 = {p.name: p.stat().st_mtime_ns for p in (out / "os_features").glob("part-*.parquet")}
    assert {n: os1[n] for n in os0} == os0 and len(os1) == len(os0) + 1  # only the new shard went through the OS pass
    ids, _, X = load_descriptors(out / "descriptors")
    assert len(ids) == man["images"] and np.isfinite(X).all()
    # an add that learns the whitening again rebuilds the index and sends every image through the OS pass again
    cfg.extract = dataclasses.replace(cfg.extract, relearn_whitening=True)
    write_synthetic(tmp_path / "more", 5, 8, seed=2, size=64)
    ingest_added(tmp_path / "more", cfg.out, cfg.ingest)
    run_stages(cfg, ["extract"])
    man2 = json.loads((rdir / "manifest.json").read_text())
    assert man2["grown_from_images"] == 0 and man2["lineage"] == man2["params"] != man["lineage"]
    os2 = {p.name: p.stat().st_mtime_ns for p in (out / "os_features").glob("part-*.parquet")}
    assert all(os2[n] != os1[n] for n in os1) and len(os2) == len(os1) + 1
