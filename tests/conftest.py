"""Shared fixtures: one embedded Ray per test session; a tiny benchmark built once."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import BenchmarkConfig, ExtractConfig, IngestConfig, RunConfig

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# official ground-truth files (../shared/data beside the checkout, or set RETRIEVAL_SHARED_DATA)
SHARED_DATA = Path(os.environ.get("RETRIEVAL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def ray_session():
    """Embedded local Ray, started once (each start costs seconds), 2 CPUs so reads are not starved."""
    import ray

    from cluster.ray_runtime import init_ray

    init_ray("", num_cpus=2)
    yield ray
    ray.shutdown()


def tiny_run_config(out: Path, *, engine: str = "local") -> RunConfig:
    cfg = RunConfig(out=str(out))
    cfg.benchmark = BenchmarkConfig(
        enabled=True, seed=1, views_per_landmark=6, queries_per_landmark=2, distractors=12, image_size=112,
        train_landmarks=["moon"], test_landmarks=["astronaut", "coffee", "rocket"],
    )
    cfg.ingest = IngestConfig(shard_size=10)
    cfg.extract = ExtractConfig(max_side=96, batch_size=4, engine=engine, actors=1, actor_num_cpus=0.5, whitening="pca",
                                whitening_dim=16, whitening_shrinkage=0.1)
    cfg.graph.k = 5
    cfg.query.kq = 3
    return cfg


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    """Benchmark folder (db/, queries/, gnd.json) shared by the end-to-end tests."""
    from pipelines.benchmark_data import build_benchmark

    out = tmp_path_factory.mktemp("bench")
    build_benchmark(tiny_run_config(out).benchmark, out)
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_benchmark):
    """A finished local run (all stages) of the tiny benchmark: (cfg, results)."""
    import shutil

    from pipelines.run import run_stages

    out = tmp_path_factory.mktemp("tiny-run") / "local"
    out.mkdir()
    shutil.copytree(tiny_benchmark, out / "benchmark")  # the benchmark is complete: not rebuilt
    cfg = tiny_run_config(out)
    res = run_stages(cfg, ["ingest", "extract", "graph", "query", "evaluate"])
    return cfg, res
