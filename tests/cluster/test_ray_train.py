"""Ray Train (TorchTrainer, DDP over gloo): 2 workers give the averaged gradients of 1 worker on a
fixed batch; the train stage runs end to end on 2 workers and writes its checkpoints."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import TrainConfig

pytestmark = pytest.mark.timeout(240)
CFG = TrainConfig(loss="triplet", margin=0.5, embed_batch=64)
TUPLES = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 1, 3], [2, 10, 11, 4]])  # 4 tuples (anchor, positive, 2 negatives)


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 64, 64, generator=g) for _ in range(12)]


def _grads(net) -> dict:
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (float32 sums in another order differ by ~1e-6 of the scale)."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-12))


def _grad_worker(config: dict) -> None:
    import ray.train

    from cluster.ray_train import worker_context
    from pipelines.train import build_net, tuple_batch_loss

    torch.set_num_threads(1)
    rt = worker_context()
    net = build_net(CFG)
    model = rt.wrap_model(net)
    if rt.world > 1:
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    loss = tuple_batch_loss(model, _images(), TUPLES[rt.rank :: rt.world], CFG)  # each worker: its half of the batch
    loss.backward()
    torch.save(_grads(net), Path(config["out"]) / f"grads-{rt.world}-{rt.rank}.pt")
    ray.train.report({"loss": float(loss.detach())})


def test_two_ddp_workers_give_the_one_worker_gradients(ray_session, tmp_path):
    from cluster.ray_train import run_workers
    from pipelines.train import build_net, tuple_batch_loss

    net = build_net(CFG)
    tuple_batch_loss(net, _images(), TUPLES, CFG).backward()
    ref = _grads(net)
    assert len(ref) > 100 and all(torch.isfinite(g).all() for g in ref.values())
    res = run_workers(_grad_worker, {"out": str(tmp_path)}, num_workers=2, cpus_per_worker=0.5, storage_path=tmp_path / "ray")
    assert res.error is None
    g0 = torch.load(tmp_path / "grads-2-0.pt", weights_only=True)
    g1 = torch.load(tmp_path / "grads-2-1.pt", weights_only=True)
    assert g0.keys() == ref.keys() == g1.keys()
    for k in ref:
        torch.testing.assert_close(g0[k], g1[k], rtol=0, atol=0)  # all-reduced: identical on both workers
        assert _rel(g0[k], ref[k]) < 1e-4, f"gradient of {k}: relative difference {_rel(g0[k], ref[k]):.2e}"
    # the halves alone differ from the full batch: the equality above needs the all-reduce
    half = build_net(CFG)
    tuple_batch_loss(half, _images(), TUPLES[0::2], CFG).backward()
    assert max(_rel(_grads(half)[k], ref[k]) for k in ref) > 1e-2


@pytest.mark.slow  # ~35 s of Ray Train start-up; the DDP mechanics are covered by the gradient test
def test_train_stage_on_two_ray_workers(ray_session, tmp_path, tiny_benchmark):
    from pipelines.checkpoints import read_checkpoint
    from pipelines.ingest import ingest
    from pipelines.train import run_train
    from tests.conftest import tiny_run_config

    run = tmp_path / "run"
    ingest(str(tiny_benchmark / "db"), run, tiny_run_config(run).ingest)
    cfg = TrainConfig(engine="ray", num_workers=2, cpus_per_worker=0.5, max_side=64, epochs=2, tuples_per_epoch=8, batch_tuples=4,
                      n_neg=2, mine_k=4, euclid_k=2, pos_k=8, neg_pool=15, neg_exclude_k=8, lr=1e-4)
    res = run_train(run, cfg)
    assert res["last"]["workers"] == 2 and res["last"]["epoch"] == 2 and res["last"]["tuples"] == 8
    ck = read_checkpoint(Path(res["checkpoint"]))
    assert ck["epoch"] == 2 and ck["step"] == 4
    assert not any(k.startswith("module.") for k in ck["model"])  # the unwrapped network, loadable without DDP
    lines = (run / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
