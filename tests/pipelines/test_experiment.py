"""The scaling-experiment runner on the tiny benchmark: levels grow one run, resume, refuse bad configs."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import ConfigError
from pipelines.config_toml import config_to_toml
from pipelines.descriptors import load_descriptors
from pipelines.experiment import load_experiment, run_experiment
from tests.conftest import tiny_run_config


def _write(tmp_path, tiny_benchmark, name, levels, engine="local", **extra) -> Path:
    d = tmp_path / name
    (d / "exp").mkdir(parents=True)
    base = tiny_run_config(d / "base-run", engine=engine)
    (d / "base.toml").write_text(config_to_toml(base))
    # the benchmark is already built: copy it where the experiment's run will look for it
    shutil.copytree(tiny_benchmark, d / "exp" / "run" / "benchmark")
    body = [f'base = "{d / "base.toml"}"', f'out = "{d / "exp"}"', f"levels = {levels}", 'methods = ["knn", "diffusion"]', "isolate = false"]
    body += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    body += ["[distractors]", "image_size = 64", "seed = 3"]
    (d / "exp.toml").write_text("\n".join(body) + "\n")
    return d / "exp.toml"


def test_two_levels_grow_one_run_with_stable_ids_and_write_results(tmp_path, tiny_benchmark):
    ecfg = load_experiment(_write(tmp_path, tiny_benchmark, "two", [0, 6], raw_forward_images=4))
    recs = run_experiment(ecfg)
    out = Path(ecfg.out)
    assert [r["level"] for r in recs] == [0, 6] and recs[1]["database"] == recs[0]["database"] + 6
    assert set(recs[0]["metrics"]) == {"knn", "diffusion"} and all(0 <= recs[1]["metrics"]["knn"][p]["map"] <= 100 for p in "EMH")
    assert set(recs[1]["stages"]) == {"add", "extract", "graph", "query", "evaluate"} and "ingest" in recs[0]["stages"]
    dis = recs[1]["distraction"]
    assert dis["distractors"] == 6 and {"near_duplicate_groups", "near_duplicate_sets"} <= set(dis)
    assert dis["near_duplicate_sets"]["distinct"] >= dis["near_duplicate_groups"]["distinct"]  # sets never join more than links do
    # each level's extraction covers its new images only, against the forward pass alone on some of them
    assert [r["extraction"]["images"] for r in recs] == [recs[0]["database"], 6]
    ex = recs[1]["extraction"]
    assert ex["raw_images"] == 4 and ex["raw_forward_img_s"] > 0 and ex["ratio"] == pytest.approx(ex["img_s"] / ex["raw_forward_img_s"])
    ids, keys, _ = load_descriptors(out / "run" / "descriptors")
    assert len(ids) == recs[1]["database"]
    base_keys = json.loads((out / "levels" / "000000000" / "config.resolved.json").read_text())  # snapshot kept
    assert base_keys["query"]["methods"] == ["knn", "diffusion"]
    added = [k for k in keys if re.search(r"dis\d{8}\.jpg$", k)]
    assert len(added) == 6 and all(i >= recs[0]["database"] for i, k in zip(ids, keys) if k in added)  # appended ids
    html = (out / "results.html").read_text()
    assert html.count("<svg") >= 6 and "levels/000000006/report.html" in html
    import pyarrow.parquet as pq

    t = pq.read_table(out / "results.parquet").to_pydict()
    assert set(t["level"]) == {0, 6} and set(t["method"]) == {"knn", "diffusion"}


def test_resume_after_a_crash_mid_level_and_after_adding_levels(tmp_path, tiny_benchmark, monkeypatch):
    import pipelines.experiment as ex

    path = _write(tmp_path, tiny_benchmark, "resume", [0, 4])
    ecfg = load_experiment(path)
    real = ex._stage
    calls = []

    def crash_on_second_graph(cfg, stage, images):
        calls.append(stage)
        if stage == "graph" and calls.count("graph") == 2:
            raise RuntimeError("injected crash")
        return real(cfg, stage, images)

    monkeypatch.setattr(ex, "_stage", crash_on_second_graph)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_experiment(ecfg)
    monkeypatch.setattr(ex, "_stage", real)
    out = Path(ecfg.out)
    first = (out / "levels" / "000000000.json").stat().st_mtime_ns
    assert not (out / "levels" / "000000004.json").exists()
    recs = run_experiment(ecfg)  # resumes at level 4: its add is not repeated, level 0 is not redone
    assert (out / "levels" / "000000000.json").stat().st_mtime_ns == first
    assert recs[1]["database"] == recs[0]["database"] + 4
    assert recs[1]["extraction"]["images"] == 4  # extracted before the crash: the rerun's empty extraction keeps that record
    # a longer experiment with the same settings continues where this one stopped
    path.write_text(path.read_text().replace("levels = [0, 4]", "levels = [0, 4, 7]"))
    recs = run_experiment(load_experiment(path))
    assert [r["database"] - recs[0]["database"] for r in recs] == [0, 4, 7]
    assert (out / "levels" / "000000000.json").stat().st_mtime_ns == first
    _, keys, X = load_descriptors(out / "run" / "descriptors")
    assert len(set(keys)) == len(keys) and np.isfinite(X).all()  # nothing added twice


def test_bad_experiment_configs_are_refused_with_the_key_named(tmp_path, tiny_benchmark):
    with pytest.raises(ConfigError, match=r"levels must be a non-empty, strictly increasing"):
        load_experiment(_write(tmp_path, tiny_benchmark, "a", [0, 0]))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['level'\]"):
        load_experiment(_write(tmp_path, tiny_benchmark, "b", [0, 1], level=3))
    p = _write(tmp_path, tiny_benchmark, "c", [0, 1])
    p.write_text(p.read_text().replace("image_size = 64", "image_size = 4"))
    with pytest.raises(ConfigError, match=r"distractors\.image_size must be >= 16"):
        load_experiment(p)
    p.write_text(p.read_text().replace("image_size = 4", "image_size = 64").replace('methods = ["knn", "diffusion"]', 'methods = ["knn", "difusion"]'))
    with pytest.raises(ConfigError, match=r"methods\[1\] must be one of"):
        load_experiment(p)
    p.write_text(p.read_text().replace("difusion", "diffusion").replace("seed = 3", "seed = 3\ngenerator = 1"))
    with pytest.raises(ConfigError, match=r"distractors\.generator must be one of 2, 3, 4; got 1"):
        load_experiment(p)
    p.write_text(p.read_text().replace("generator = 1", "generator = 2").replace("base.toml", "missing.toml"))
    with pytest.raises(ConfigError, match=r"base = .*missing.toml.*not found"):
        load_experiment(p)


@pytest.mark.timeout(400)
def test_isolated_stages_run_in_child_processes_and_report_their_memory(tmp_path, tiny_benchmark, capfd):
    """Each stage in a process of its own, all on one Ray the runner starts, the model actors started
    before the first level and found warm by every extraction (the base's and each level's)."""
    path = _write(tmp_path, tiny_benchmark, "iso", [0, 2], engine="ray_actors")
    path.write_text(path.read_text().replace("isolate = false", "isolate = true"))
    recs = run_experiment(load_experiment(path))
    rec = recs[1]
    assert set(recs[0]["stages"]) == {"ingest", "extract", "graph", "query", "evaluate"}
    assert set(rec["stages"]) == {"add", "extract", "graph", "query", "evaluate"}
    assert all(s["isolated"] and 0.05 < s["peak_rss_gib"] < 8 for s in rec["stages"].values())
    assert rec["database"] == rec["base_images"] + 2
    ex = rec["extraction"]
    assert ex["images"] == 2 and ex["raw_forward_img_s"] > 0  # measured in a child too
    assert ex["model_img_s"] > 0 and ex["model_ratio"] == pytest.approx(ex["img_s"] / ex["model_img_s"])  # the actors' own clocks
    assert rec["shared_ray"]["model_actors_start_s"] > 0 and rec["shared_ray"]["ray_started"] in (True, False)
    err = capfd.readouterr().err  # the children log as the CLI does: faiss's loader attempts are not shown
    assert "pipelines.graph" in err and "swigfaiss" not in err and "faiss.loader" not in err
    # database and queries at level 0, the new images at level 2: every time the one actor started before level 0
    assert err.count("extract: 1 model actors (1 warm") == 3 and "(0 warm" not in err
    from cluster.ray_runtime import ray_is_up

    if ray_is_up():  # the runner joined this process's Ray (the test session's) and left it running, its actors stopped
        from cluster.extract_actors import pool_names

        assert pool_names() == []


def test_a_user_error_in_an_isolated_stage_is_one_line(tmp_path, tiny_benchmark, capfd):
    from pipelines.config import RunConfig

    base = RunConfig(out=str(tmp_path / "x"))
    base.dataset.database = str(tmp_path / "no-such-folder")
    (tmp_path / "base.toml").write_text(config_to_toml(base))
    (tmp_path / "exp.toml").write_text(f'base = "{tmp_path / "base.toml"}"\nout = "{tmp_path / "exp"}"\nlevels = [0]\n')
    with pytest.raises(ValueError, match="experiment: stage ingest of this level stopped on the error above"):
        run_experiment(load_experiment(tmp_path / "exp.toml"))
    err = capfd.readouterr().err
    assert "error: " in err and "no-such-folder" in err and "Traceback" not in err


def test_the_experiment_methods_replace_the_base_configs_own(tmp_path):
    from pipelines.experiment import run_config

    (tmp_path / "base.toml").write_text('[query]\nmethods = ["knn", "regional"]\nkq = 7\n')  # regional: invalid without regions
    (tmp_path / "exp.toml").write_text(f'base = "{tmp_path / "base.toml"}"\nlevels = [0]\nmethods = ["knn", "aqe"]\n')
    cfg = run_config(load_experiment(tmp_path / "exp.toml"))
    assert cfg.query.methods == ["knn", "aqe"] and cfg.query.kq == 7


def test_synthetic_distractors_are_the_same_whatever_the_batches_and_workers(tmp_path):
    from pipelines.distractors import synthetic_name, write_synthetic

    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic(a, 0, 300, seed=5, size=48, workers=2)  # two spawned workers, two chunks
    write_synthetic(b, 120, 300, seed=5, size=48, workers=1)
    write_synthetic(b, 0, 120, seed=5, size=48, workers=1)
    names = [synthetic_name(i) for i in range(300)]
    assert sorted(p.name for p in a.iterdir()) == names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    kept = (a / names[7]).stat().st_mtime_ns
    write_synthetic(a, 0, 301, seed=5, size=48)  # resume: only the missing one is written
    assert (a / names[7]).stat().st_mtime_ns == kept and (a / synthetic_name(300)).is_file()
    from PIL import Image

    ims = [np.asarray(Image.open(a / n)) for n in names[:40]]
    assert all(im.ndim == 3 and 48 in im.shape[:2] for im in ims)
    assert len({im.tobytes() for im in ims}) == 40 and np.std([im.mean() for im in ims]) > 5  # distinct, not one look
    write_synthetic(tmp_path / "c", 0, 3, seed=6, size=48)
    assert (tmp_path / "c" / names[0]).read_bytes() != (a / names[0]).read_bytes()  # the seed matters


def test_another_distractor_generator_is_not_mixed_into_an_experiment(tmp_path, tiny_benchmark):
    path = _write(tmp_path, tiny_benchmark, "gen", [0])
    assert load_experiment(path).distractors.generator == 4  # the default
    run_experiment(load_experiment(path))
    path.write_text(path.read_text() + "generator = 2\n")  # [distractors] is the file's last table
    with pytest.raises(ConfigError, match="synthetic distractors' generator"):
        run_experiment(load_experiment(path))


@pytest.mark.parametrize("generator", [2, 3, 4])
def test_each_generator_draws_its_own_images_the_same_for_the_same_seed(generator):
    from pipelines.benchmark_data import DISTRACTOR_SOURCES, load_photo
    from retrieval.distractor_images import DistractorMaker

    maker = DistractorMaker([load_photo(n) for n in DISTRACTOR_SOURCES[:3]], generator)
    ims = [maker(np.random.default_rng([4, i]), 64) for i in range(30)]
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 and 64 in im.shape[:2] for im in ims)
    again = DistractorMaker([load_photo(n) for n in DISTRACTOR_SOURCES[:3]], generator)
    assert all(np.array_equal(im, again(np.random.default_rng([4, i]), 64)) for i, im in enumerate(ims))
    for g in {2, 3, 4} - {generator}:
        other = DistractorMaker([load_photo(n) for n in DISTRACTOR_SOURCES[:3]], g)
        assert sum(np.array_equal(im, other(np.random.default_rng([4, i]), 64)) for i, im in enumerate(ims)) == 0
    assert len({im.tobytes() for im in ims}) == 30 and np.std([im.std() for im in ims]) > 3
    with pytest.raises(ValueError, match=r"generator must be one of \(2, 3, 4\)"):
        DistractorMaker([], 5)


@pytest.mark.parametrize("generator", [3, 4])
def test_generators_3_and_4_draw_every_kind_of_layer(monkeypatch, generator):
    from retrieval.distractor_images import DistractorMaker

    maker = DistractorMaker([np.random.default_rng(0).uniform(size=(40, 50, 3))], generator)
    for kind in DistractorMaker.KINDS:  # each kind alone, as the whole image, a region and as patches
        p = tuple(float(k == kind) for k in DistractorMaker.KINDS)
        for odds in ("BASE_P", "PATCH_P", "REGION_P"):
            monkeypatch.setattr(DistractorMaker, odds, p)
        for seed in range(4):  # generator 4's fractal transfers: as is, ridged, banded
            im = maker(np.random.default_rng(seed), 48)
            assert im.shape[2] == 3 and im.dtype == np.uint8 and im.std() > 1, kind


def test_generator_4_fills_the_frame_with_2_to_4_regions(monkeypatch):
    """Each Voronoi cell of generator 4's base gets its own layer: a solid colour per layer here."""
    from PIL import Image

    from retrieval.distractor_images import DistractorMaker

    drawn: list[int] = []  # the colour of each layer drawn, in order

    def solid(self, rng, w, h, p):
        drawn.append(10 * (len(drawn) + 1))
        return Image.new("RGB", (w, h), (drawn[-1],) * 3)

    monkeypatch.setattr(DistractorMaker, "_layer3", solid)
    maker = DistractorMaker([], 4)
    counts = []
    for seed in range(12):
        drawn.clear()
        im = np.asarray(maker._regions(np.random.default_rng(seed), 60, 40))
        assert im.shape == (40, 60, 3)
        assert sorted(np.unique(im[..., 0]).tolist()) == drawn  # every layer drawn shows in its own cell
        counts.append(len(drawn))
    assert min(counts) == 2 and max(counts) <= 4 and len(set(counts)) > 1


def test_a_child_step_reports_through_its_result_file_whatever_it_prints(tmp_path, monkeypatch, capsys):
    import pipelines.experiment as ex
    from pipelines.config import RunConfig

    (tmp_path / "run.toml").write_text(config_to_toml(RunConfig(out=str(tmp_path / "run"))))

    def noisy(cfg, stage, images):
        print("(raylet) a library's line on stdout")  # Ray forwards worker logs to the driver's stdout
        return {"measured": 3}

    monkeypatch.setattr(ex, "_stage", noisy)
    assert ex.main(["--child", "graph", "--run-config", str(tmp_path / "run.toml"), "--result", str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["measured"] == 3 and got["peak_rss_gib"] > 0 and "raylet" in capsys.readouterr().out


def test_killed_distractor_drawing_leaves_no_worker_behind(tmp_path):
    """An experiment killed while it draws distractors: its spawned workers stop at their next image
    (a pool worker would finish its chunk, then wait for more work forever, an orphan beside the rerun)."""
    import os
    import subprocess
    import sys
    import time

    def stat(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split(), open(f"/proc/{pid}/cmdline").read()
        except OSError:
            return None, ""

    out = tmp_path / "d"
    code = ("import sys; from pathlib import Path; from pipelines.distractors import write_synthetic; "
            "write_synthetic(Path(sys.argv[1]), 0, 4000, seed=0, size=224, workers=2)")
    p = subprocess.Popen([sys.executable, "-c", code, str(out)])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.jpg")) if out.is_dir() else []) < 4:
        time.sleep(0.1)
    workers = [int(d) for d in os.listdir("/proc") if d.isdigit()
               for st, cmd in [stat(d)] if st and int(st[1]) == p.pid and "spawn_main" in cmd]
    assert workers, "no drawing worker started"
    p.kill()
    p.wait()

    def alive(pid):
        st, _ = stat(pid)
        return st is not None and st[0] != "Z"

    deadline = time.time() + 15
    while time.time() < deadline and any(alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(alive(w) for w in workers)


def test_an_os_egm_levels_record_carries_both_passes_rates(tmp_path):
    """pooling = "os_egm" extracts twice: the level's record gives the FS.EGM pass's rate, the OS.EGM
    pass's and the region index's time (run/extract.json, as `stage_extract` writes it)."""
    from pipelines.experiment import ExperimentConfig, _extraction

    run = tmp_path / "run"
    run.mkdir()
    (run / "extract.json").write_text(json.dumps({"images": 100, "seconds": 2.0, "steady_img_s": 60.0, "regions_s": 3.5,
                                                  "os": {"images": 100, "seconds": 4.0, "steady_img_s": 30.0}}))
    ex = _extraction(ExperimentConfig(raw_forward_images=0), tmp_path / "exp.toml", None, run)
    assert ex["img_s"] == 50.0 and ex["os_img_s"] == 25.0 and ex["os_steady_img_s"] == 30.0 and ex["regions_s"] == 3.5
    (run / "extract.json").write_text(json.dumps({"images": 100, "seconds": 2.0}))  # any other pooling: one pass
    assert "os_img_s" not in _extraction(ExperimentConfig(raw_forward_images=0), tmp_path / "exp.toml", None, run)
