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
