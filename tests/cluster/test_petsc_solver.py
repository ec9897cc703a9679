"""PETSc CG under mpiexec (1 and 2 ranks) equals the scipy block CG, through the query stage."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import GraphConfig, QueryConfig
from pipelines.graph import run_graph
from pipelines.import_descriptors import import_descriptors
from pipelines.query import run_query
from retrieval.whitening import l2_normalize

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("ranks,launch", [(1, "mpiexec"), (2, "mpiexec"), (2, "ray")])
def test_petsc_equals_scipy(tmp_path, ranks, launch, request):
    """launch = "ray": the ranks are placed by a Ray placement group (one per bundle) and mpiexec is
    started from a Ray task inside it."""
    if launch == "ray":
        request.getfixturevalue("ray_session")
    rng = np.random.default_rng(3)
    X = l2_normalize(rng.normal(size=(900, 12)))
    np.save(tmp_path / "db.npy", X)
    np.save(tmp_path / "q.npy", X[:12])
    run = tmp_path / "run"
    import_descriptors(run, tmp_path / "db.npy", queries=tmp_path / "q.npy")
    run_graph(run, GraphConfig(k=10, block_rows=200, index="flat"))  # 5 blocks shared by the ranks
    cfg = QueryConfig(methods=["diffusion", "petsc"], topk=40, kq=5, alpha=0.95, rtol=1e-9, maxiter=1000, petsc_ranks=ranks,
                      petsc_launch=launch)
    run_query(run, run / "queries", cfg)
    a = pq.read_table(run / "ranks" / "diffusion.parquet").to_pydict()
    b = pq.read_table(run / "ranks" / "petsc.parquet").to_pydict()
    np.testing.assert_allclose(np.array(b["scores"]), np.array(a["scores"]), rtol=1e-6)
    np.testing.assert_array_equal(np.array(b["ids"])[:, :10], np.array(a["ids"])[:, :10])
    assert all(b["converged"])
    assert np.abs(np.array(b["iterations"]) - np.array(a["iterations"])).max() <= 2


def test_mpi_hosts_from_bundle_addresses():
    from cluster.petsc_ray import mpi_hosts

    assert mpi_hosts(["10.0.0.2", "10.0.0.3", "10.0.0.2"]) == "10.0.0.2:2,10.0.0.3:1"


def test_regional_diffusion_solved_on_petsc_ranks_equals_the_exact_solve(tmp_path):
    """`[query] region_solver = "petsc"`: the region graph's rows read by the MPI ranks from its folder
    (the driver never loads it), each query's region scores pooled per image as with the exact
    block CG; truncated diffusion over every node agrees too (a query's regions share seeds: they
    add up in every solver), and a short `region_keep` still ranks."""
    from pipelines.graph import write_graph
    from pipelines.rankers import Rankers
    from retrieval.graph import build_graph

    rng = np.random.default_rng(4)
    n_img, per = 60, 5
    centres = rng.normal(size=(12, 12))
    V = l2_normalize(centres[rng.integers(0, 12, n_img * per)] + 0.3 * rng.normal(size=(n_img * per, 12))).astype(np.float32)
    owner = np.repeat(np.arange(n_img), per)
    W, _ = build_graph(V, k=8)
    rdir = tmp_path / "run" / "regions"
    rdir.mkdir(parents=True)
    for name, arr in (("vectors.npy", V), ("owner.npy", owner), ("ids.npy", np.arange(n_img))):
        np.save(rdir / name, arr)
    write_graph(W, rdir / "graph", block_rows=64, manifest={"n": W.shape[0], "nnz": W.nnz})
    (rdir / "manifest.json").write_text("{}")
    X = l2_normalize(rng.normal(size=(n_img, 12))).astype(np.float32)
    regions = [l2_normalize(V[owner == i][:3] + 0.05 * rng.normal(size=(3, 12))).astype(np.float32) for i in range(0, n_img, 6)]
    common = dict(methods=["regional"], kq=5, alpha=0.9, rtol=1e-10, maxiter=1000, petsc_ranks=2)

    def rank(solver, **kw):
        r = Rankers(X, QueryConfig(**common, region_solver=solver, **kw), graph_dir=tmp_path / "run" / "graph")
        return r.rank("regional", X[: len(regions)], 20, regions=regions)

    exact, petsc = rank("exact"), rank("petsc")
    np.testing.assert_allclose(petsc.scores, exact.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(petsc.ids[:, :10], exact.ids[:, :10])
    assert petsc.stats.converged.all() and len(petsc.stats.iterations) == len(regions)
    trunc = rank("truncated", truncate_m=len(V), truncate_select="bfs")
    np.testing.assert_allclose(trunc.scores, exact.scores, rtol=1e-4, atol=1e-6)
    short = rank("petsc", region_keep=20)  # 20 region scores per query: still a ranking, led by images the full one ranks high
    assert short.ids.shape == (len(regions), 20) and all(short.ids[q, 0] in exact.ids[q, :5] for q in range(len(regions)))


@pytest.mark.parametrize("ranks", [1, 2])
def test_katz_centrality_on_petsc_ranks_equals_block_cg(tmp_path, ranks):
    from cluster.petsc_solver import katz_with_mpiexec
    from pipelines.graph import write_graph
    from pipelines.rankers import GRAPH_ROWS_READER
    from retrieval.graph import build_graph
    from retrieval.regional import katz_centrality

    X = l2_normalize(np.random.default_rng(6).normal(size=(500, 10)))
    W, _ = build_graph(X, k=8)
    write_graph(W, tmp_path / "g", block_rows=128, manifest={"n": W.shape[0], "nnz": W.nnz})
    want, _ = katz_centrality(W, alpha=0.95, rtol=1e-10, maxiter=2000)
    g, st = katz_with_mpiexec(tmp_path / "g", reader=GRAPH_ROWS_READER, ranks=ranks, alpha=0.95, rtol=1e-10, maxiter=2000)
    assert g.shape == (500,) and st["converged"].all()
    np.testing.assert_allclose(g, want, rtol=1e-7)
