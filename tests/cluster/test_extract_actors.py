"""The warm model actors (`engine = "ray_actors"`): kept actors are reused, another extractor replaces
them, nothing is left behind unless asked, and the Ray Data engine frees their CPUs."""
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.descriptors import load_descriptors
from pipelines.extract import extract_features, warm_model_actors
from pipelines.run import run_stages
from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_benchmark):
    out = tmp_path_factory.mktemp("actors") / "run"
    out.mkdir()
    shutil.copytree(tiny_benchmark, out / "benchmark")
    cfg = tiny_run_config(out, engine="ray_actors")
    run_stages(cfg, ["ingest"])
    return cfg


def _extract(cfg, tmp_path, name, **changes):
    """extract_features on a fresh copy of the run's image shards (nothing done yet)."""
    run = tmp_path / name
    shutil.copytree(Path(cfg.out) / "images", run / "images")
    summary = extract_features(run / "images", run, dataclasses.replace(cfg.extract, **changes))
    return summary, load_descriptors(run / "features")


def _pids():
    import ray

    from cluster.extract_actors import NAMESPACE, pool_names

    return {n: ray.get(ray.get_actor(n, namespace=NAMESPACE).pid.remote()) for n in pool_names()}


@pytest.mark.timeout(300)
def test_kept_actors_are_reused_and_replaced_by_another_extractor(ray_session, ingested, tmp_path):
    from cluster.extract_actors import stop_pool

    cfg = ingested
    try:
        started = warm_model_actors(dataclasses.replace(cfg.extract, keep_actors=True))
        before = _pids()
        assert sorted(before.values()) == sorted(started) and len(before) == cfg.extract.actors
        s1, a = _extract(cfg, tmp_path, "one", keep_actors=True)
        s2, b = _extract(cfg, tmp_path, "two", keep_actors=True)
        assert _pids() == before  # the same processes: found warm, not started again
        assert s1["model_img_s"] > 0 and s2["model_img_s"] > 0  # the actors' forward clocks, read around each extraction
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[2], b[2])
        # another extractor (other pooling): the kept pool is replaced, not added to (it would hold the CPUs)
        _extract(cfg, tmp_path, "mac", keep_actors=True, pooling="mac")
        after = _pids()
        assert len(after) == cfg.extract.actors and not set(after) & set(before)
        # not kept: the stage's actors are gone when it ends
        _extract(cfg, tmp_path, "unkept", keep_actors=False)
        assert _pids() == {}
        # the Ray Data engine stops kept actors first: its read tasks need their CPUs (else it hangs)
        _extract(cfg, tmp_path, "kept-again", keep_actors=True)
        assert _pids()
        s3, c = _extract(cfg, tmp_path, "ray-data", engine="ray")
        assert _pids() == {} and s3["model_img_s"] is None  # Ray Data's actors are anonymous: no clock to read
        np.testing.assert_allclose(c[2], a[2], atol=1e-5)
    finally:
        stop_pool()


def test_actors_that_do_not_fit_the_cluster_are_refused_with_the_settings_named(ray_session, ingested, tmp_path):
    from cluster.errors import ClusterError

    with pytest.raises(ClusterError, match=r"3 model actors x 1 CPUs do not fit the cluster's 2 CPUs"):
        _extract(ingested, tmp_path, "big", actors=3, actor_num_cpus=1.0)


@pytest.mark.timeout(300)
def test_the_actors_read_their_rows_and_a_shard_they_cannot_read_is_one_clear_error(ray_session, ingested, tmp_path):
    """The driver deals row ranges; the actors read the shards. A shard gone before its actor reads it
    (a node that does not see the run's folder) is a ClusterError naming it, not a task traceback."""
    from cluster.errors import ClusterError
    from pipelines.shards import list_shards

    run = tmp_path / "gone"
    shutil.copytree(Path(ingested.out) / "images", run / "images")
    last = list_shards(run / "images")[-1]
    assert len(list_shards(run / "images")) >= 2

    def progress(n):  # the first results are in: the last shard has not been read yet (one row per chunk)
        last.unlink(missing_ok=True)

    from pipelines.extract import decoder, default_extractor
    from cluster.extract_actors import extract_shards_actors

    ecfg = dataclasses.replace(ingested.extract, batch_size=1)
    with pytest.raises(ClusterError, match=rf"a model actor cannot read .*{last.name}: .*every node must see the run's folder"):
        for _ in extract_shards_actors(list_shards(run / "images"), default_extractor(ecfg), prepare=decoder(ecfg), actors=1,
                                       num_cpus=0.5, batch_size=1, progress=progress):
            pass


def test_row_ranges_cover_every_row_once_and_end_in_quarter_chunks():
    from cluster.extract_actors import _row_ranges

    got = list(_row_ranges([Path("a"), Path("b")], [10, 7], 4, tail_rows=6))
    # whole chunks while more than tail_rows rows are left, then quarter chunks (and no range across shards)
    assert [(p, j - i) for p, i, j in got] == [("a", 4), ("a", 4), ("a", 2), ("b", 4), ("b", 1), ("b", 1), ("b", 1)]
    assert [(i, j) for p, i, j in got if p == "a"][:2] == [(0, 4), (4, 8)]
    for name, n in (("a", 10), ("b", 7)):
        rs = [(i, j) for p, i, j in got if p == name]
        assert rs[0][0] == 0 and rs[-1][1] == n and all(a[1] == b[0] for a, b in zip(rs, rs[1:]))


def test_equal_extractors_loaded_apart_share_a_pool_key(tmp_path):
    """The experiment warms the actors from its configuration and each stage loads the written copy:
    their pickles differ (pickle shares equal strings by identity), their pool keys must not."""
    from cluster.extract_actors import pool_key
    from pipelines.config import load_config
    from pipelines.config_toml import config_to_toml
    from pipelines.extract import decoder, default_extractor

    cfg = load_config("deploy/configs/demo-224.toml")
    (tmp_path / "run.toml").write_text(config_to_toml(cfg))
    copy = load_config(tmp_path / "run.toml")

    def key(c):
        return pool_key(default_extractor(c), decoder(c), 0.5, 0.0)

    assert key(cfg.extract) == key(copy.extract)
    assert key(dataclasses.replace(copy.extract, gem_p=2.0)) != key(cfg.extract)
