"""A Ray head and a worker node as separate processes on this machine: a pipeline run submitted with
`retrieval submit` equals the embedded run, also when the worker node is killed mid-extraction."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.descriptors import load_descriptors
from pipelines.run import run_stages
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.timeout(600)
STAGES = ["ingest", "extract", "graph", "query", "evaluate"]


def _cfg(base: Path, bench: Path, name: str):
    out = base / name
    out.mkdir()
    shutil.copytree(bench, out / "benchmark")  # complete: not rebuilt
    cfg = tiny_run_config(out, engine="ray")
    cfg.extract.actor_num_cpus = 1.0
    cfg.extract.decode_num_cpus = 0.25
    return cfg


@pytest.fixture(scope="module")
def embedded_run(ray_session, tmp_path_factory, tiny_benchmark):
    cfg = _cfg(tmp_path_factory.mktemp("embedded"), tiny_benchmark, "embedded")
    run_stages(cfg, STAGES)
    return Path(cfg.out)


@pytest.fixture(scope="module")
def cluster():
    from cluster.local_cluster import LocalCluster

    c = LocalCluster(head_cpus=0)  # the head runs only the job drivers: the work happens on workers
    c.worker = c.add_worker(2)
    yield c
    c.shutdown()


def _same_outputs(a: Path, b: Path) -> None:
    for sub in ("", "queries"):
        ia, ka, Xa = load_descriptors(a / sub / "descriptors")
        ib, kb, Xb = load_descriptors(b / sub / "descriptors")
        np.testing.assert_array_equal(ia, ib)  # every id exactly once: nothing lost or duplicated
        assert ka == kb
        np.testing.assert_allclose(Xa, Xb, atol=1e-5)
    for m in ("knn", "diffusion"):
        ra, rb = pq.read_table(a / "ranks" / f"{m}.parquet").to_pydict(), pq.read_table(b / "ranks" / f"{m}.parquet").to_pydict()
        assert ra["query"] == rb["query"]
        assert [r[:10] for r in ra["ids"]] == [r[:10] for r in rb["ids"]]
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    for m in ma:
        for p in ma[m]:
            assert ma[m][p] == pytest.approx(mb[m][p], abs=1e-6)


def _submit_cli(cfg, tmp_path, address, *extra) -> str:
    from pipelines.cli import main
    from pipelines.config_toml import config_to_toml

    path = tmp_path / f"{Path(cfg.out).name}.toml"
    path.write_text(config_to_toml(cfg))
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["submit", str(path), "--address", address, *extra]) == 0
    return buf.getvalue().split()[1].rstrip(";")


def test_submitted_run_equals_embedded_run(cluster, embedded_run, tmp_path, tiny_benchmark):
    """Also runs the PETSc solve from the cluster: 2 MPI ranks placed by a Ray placement group."""
    from cluster.ray_jobs import job_status, wait_job

    cfg = _cfg(tmp_path, tiny_benchmark, "submitted")
    cfg.query.methods = ["knn", "aqe", "diffusion", "petsc"]
    cfg.query.petsc_launch, cfg.query.petsc_ranks = "ray", 2
    job = _submit_cli(cfg, tmp_path, cluster.dashboard_url)
    status = wait_job(cluster.dashboard_url, job, timeout=400)
    assert status == "SUCCEEDED", job_status(cluster.dashboard_url, job)
    assert job_status(cluster.dashboard_url, job)["out"] == cfg.out
    from pipelines.cli import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["logs", job, "--address", cluster.dashboard_url]) == 0
    assert "== stage evaluate ==" in buf.getvalue() and "mAP (%)" in buf.getvalue()
    _same_outputs(embedded_run, Path(cfg.out))
    diff = pq.read_table(Path(cfg.out) / "ranks" / "diffusion.parquet").to_pydict()
    petsc = pq.read_table(Path(cfg.out) / "ranks" / "petsc.parquet").to_pydict()
    assert all(petsc["converged"]) and [r[:5] for r in petsc["ids"]] == [r[:5] for r in diff["ids"]]


def test_worker_node_killed_mid_extraction(cluster, embedded_run, tmp_path, tiny_benchmark):
    """The worker node running the extraction actor dies after the first descriptor shard; a new
    node joins (as an autoscaler would add one); the job completes with identical outputs."""
    from cluster.ray_extract import DELAY_ENV
    from cluster.ray_jobs import job_status, submit_run, wait_job
    from pipelines.config import absolute_paths
    from pipelines.config_toml import config_to_toml

    cfg = absolute_paths(_cfg(tmp_path, tiny_benchmark, "killed"), Path.cwd())
    job = submit_run(config_to_toml(cfg), out=cfg.out, address=cluster.dashboard_url, env={DELAY_ENV: "1.0"})
    t0 = time.monotonic()
    while not cluster.alive_actors("_EmbedActor"):  # the model actor is up and embedding (1 s per batch)
        assert time.monotonic() - t0 < 300, job_status(cluster.dashboard_url, job)
        time.sleep(0.2)
    time.sleep(2.0)
    n_done = len(list((Path(cfg.out) / "features").glob("part-*.parquet")))
    cluster.kill_node(cluster.worker)
    cluster.worker = cluster.add_worker(2)
    status = wait_job(cluster.dashboard_url, job, timeout=400)
    assert status == "SUCCEEDED", job_status(cluster.dashboard_url, job)
    n_shards = len(list((Path(cfg.out) / "images").glob("part-*.parquet")))
    assert n_done < n_shards  # the node really died in the middle of extraction
    _same_outputs(embedded_run, Path(cfg.out))


def test_job_api_refuses_requests_without_the_token(cluster):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/", timeout=10)
    assert e.value.code == 401
    req = urllib.request.Request(f"{cluster.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def test_every_node_listens_on_loopback_only(cluster):
    """Issue 11: GCS, raylets, agents, metrics exporters, Ray Client server, job API: all 127.0.0.1."""
    from cluster.listeners import tree_listeners

    socks = tree_listeners([p.pid for p in cluster.nodes])
    ports = {s.port for s in socks}
    assert cluster.port in ports and int(cluster.dashboard_url.rsplit(":", 1)[1]) in ports, socks
    assert len({s.pid for s in socks}) >= 4, socks  # head and worker processes, not just one
    assert [s for s in socks if not s.loopback] == []
