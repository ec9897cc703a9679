"""Ray starts in one place (cluster.ray_runtime.init_ray, from `ray_address`): a run never joins a
cluster that `ray start` left on this machine, and an engine never starts Ray implicitly.

Each check runs in a fresh process (no session fixture there), since this test process may
already hold the embedded Ray of other tests.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _gcs(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GCS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return lines[-1].split()[1].rsplit(":", 1)[1]  # the GCS port (the address may name any of the host's IPs)


def test_a_run_never_joins_a_stray_local_cluster(tmp_path):
    from cluster.local_cluster import LocalCluster
    from pipelines.import_descriptors import import_descriptors
    from retrieval.whitening import l2_normalize

    X = l2_normalize(np.random.default_rng(0).normal(size=(300, 8)))
    np.save(tmp_path / "db.npy", X)
    import_descriptors(tmp_path / "run", tmp_path / "db.npy")
    with LocalCluster(head_cpus=1) as stray:  # `ray start --head`: what a bare ray.init() on this machine joins
        env = dict(stray.env)
        # Ray finds "the" local cluster through this file, which the latest Ray started here rewrote
        # (another test's embedded Ray, say): point it at the stray cluster, as `ray start` left it
        current = Path("/tmp/ray/ray_current_cluster")
        current.parent.mkdir(parents=True, exist_ok=True)
        current.write_text(stray.address)
        # control: a bare ray.init() does join it, so the check below can fail
        assert _gcs(_python("import ray; ray.init(); print('GCS', ray.get_runtime_context().gcs_address)", env)) == str(stray.port)
        run = _python(f"""
            import ray
            from pipelines.config import RunConfig
            from pipelines.run import run_stages
            cfg = RunConfig(out={str(tmp_path / "run")!r})
            cfg.graph.k, cfg.graph.engine, cfg.graph.index, cfg.graph.shards = 5, "ray", "flat", 3
            run_stages(cfg, ["graph"])
            print("GCS", ray.get_runtime_context().gcs_address)
        """, env)
        assert _gcs(run) != str(stray.port)
        assert (tmp_path / "run" / "graph" / "manifest.json").is_file()


def test_engines_refuse_to_start_ray_implicitly():
    proc = _python("""
        import numpy as np
        from cluster.ray_graph import search_shards_ray
        from retrieval.knn import build_index, IndexSpec
        X = np.eye(4, dtype=np.float32)
        try:
            search_shards_ray(build_index(X, IndexSpec("flat")), X, [(0, 4)], 2)
        except RuntimeError as e:
            print("REFUSED", e)
        import ray
        print("INITIALISED", ray.is_initialized())
    """, {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}, timeout=120)
    assert "REFUSED" in proc.stdout and "init_ray" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "INITIALISED False" in proc.stdout


def test_a_local_cluster_never_hands_out_one_port_twice(monkeypatch):
    """Ports chosen for a node are distinct, and distinct from those chosen for earlier nodes, even
    when the operating system offers the same free port again (a node given one port for two of its
    listeners exits at start)."""
    import cluster.local_cluster as lc

    assert len(set(lc.free_ports(20))) == 20
    offers = iter([[5001, 5001, 5002], [5002], [5003], [5003, 5004], [5005]])  # what the system offers, call by call
    monkeypatch.setattr(lc, "free_ports", lambda count: next(offers))
    c = object.__new__(lc.LocalCluster)
    c._taken = set()
    assert c._ports(3) == [5001, 5002, 5003]
    assert c._ports(2) == [5004, 5005]
