"""The scale benchmark script runs end to end on a small N and its numbers are consistent."""
import json

import pytest

from pipelines.benchmarks.scale import main


@pytest.mark.timeout(300)
def test_scale_benchmark_small(tmp_path):
    assert main(["all", "--n", "3000", "--queries", "40", "--out", str(tmp_path), "--loop-queries", "10", "--petsc-queries", "10",
                 "--spectral-rank", "40", "--truncate-m", "500", "--methods", "cg-float64", "cg-float64-scipy", "cg-loop", "truncated", "spectral", "petsc2"]) == 0
    r = json.loads((tmp_path / "3000" / "results.json").read_text())
    m = r["methods"]
    assert r["graphs"][0]["recall_at_k"] == 1.0  # flat index
    # the loop of scipy cg and PETSc solve the same systems as block CG: same rankings on the same queries
    assert m["scipy cg loop (reference)"]["map_subset"] == pytest.approx(m["block CG float64"]["map_subset"], abs=1e-6)
    assert m["PETSc CG 2 ranks"]["map_subset"] == pytest.approx(m["block CG float64"]["map_subset"], abs=1e-6)
    assert m["block CG float64"]["not_converged"] == 0
    assert m["spmm"]["ratio_measured_to_bound"] > 0
    f64 = m["spmm"]["float64"]
    for o in ("rcm", "partition"):  # the compiled product and a fused CG iteration in each row order, against their bounds
        c = f64[f"compiled-{o}"]
        assert c["seconds"] > 0 and c["cg_iteration_seconds"] > 0 and c["x_cut"] > 0 and c["cg_x_iteration"] > 0
        assert f64["stream_bound_seconds"] <= c["cut_bound_seconds"] <= f64["gather_bound_seconds"]
        assert 0 <= m["spmm"]["orders"][o]["cut_fraction"] < 1
    assert "## Graph construction" in (tmp_path / "RESULTS.md").read_text()


def test_exact_search_step_compares_the_three_paths_and_restores_the_threshold(tmp_path):
    import faiss
    import numpy as np

    from pipelines.benchmarks.exact_search import step_knn
    from retrieval.knn import FLAT_BLAS_THRESHOLD

    rng = np.random.default_rng(0)
    np.save(tmp_path / "X.npy", rng.normal(size=(500, 16)).astype(np.float32))
    np.save(tmp_path / "Q.npy", rng.normal(size=(20, 16)).astype(np.float32))
    rows = step_knn(tmp_path, grid=((1, 5), (20, 5)), repeats=1)["knn"]
    assert [(r["queries"], r["k"]) for r in rows] == [(1, 5), (20, 5)]
    assert all(r[key] > 0 for r in rows for key in ("faiss_default_ms", "faiss_ms", "blocked_ms"))
    assert faiss.cvar.distance_compute_blas_threshold == FLAT_BLAS_THRESHOLD


@pytest.mark.timeout(300)
def test_growth_benchmark_updates_and_compares_with_a_full_build(tmp_path):
    """Issue 13: the growth benchmark drives the CLI (import, graph, import the grown rows,
    graph = an update, fresh full build) and records each step; the exact update gives the full
    build's graph (same nnz) and says which rows it came from."""
    from pipelines.benchmarks.growth import markdown, run

    r = run(tmp_path, 1500, "flat", 0.2, 8)
    assert r["update"]["updated_from_rows"] == 1500 and r["update"]["n"] == r["full_grown"]["n"] == 1800
    assert r["update"]["nnz"] == r["full_grown"]["nnz"] and "updated_from_rows" not in r["full_grown"]
    assert all(r[s]["wall_s"] > 0 and r[s]["peak_gib"] > 0 for s in ("full_n", "update", "full_grown"))
    assert "update / full build (flat)" in markdown(r) and (tmp_path / "growth-1500-flat.json").is_file()


@pytest.mark.timeout(300)
def test_region_scale_builds_the_region_index_and_ranks_with_each_solver(tmp_path):
    from pipelines.benchmarks.region_scale import main as region_scale

    assert region_scale(["--images", "300", "--regions", "4", "--shard-images", "100", "--out", str(tmp_path), "--index", "flat",
                         "--queries", "5", "--solvers", "exact", "truncated"]) == 0
    r = json.loads((tmp_path / "query-results.json").read_text())
    assert r["region_nodes"] == 1200 and set(r["solvers"]) == {"exact", "truncated"}
    # truncated on 2,000-node subgraphs of a 1,200-node graph: the whole graph, the exact answer
    assert r["solvers"]["truncated"]["top10_agreement"] == 1.0 and r["solvers"]["exact"]["converged"] == 5
