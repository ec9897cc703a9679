"""Ray Train wiring for fine-tuning: a TorchTrainer runs `pipelines.train.train_loop` on
`num_workers` DDP workers (one per GPU on a cluster, CPU workers with gloo here).

Thin: the loop, the data sharding (pool rows and each step's tuples split by rank) and the
checkpoints are the train stage's; this module only starts the workers, gives each its rank,
device and DDP wrapper, and forwards per-epoch metrics to `ray.train.report`. Checkpoints are
written by rank 0 to the run directory, which must therefore be on storage every node shares.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def run_workers(loop: Callable[[dict], None], config: dict, *, num_workers: int, use_gpu: bool = False,
                cpus_per_worker: float = 1.0, storage_path: str | Path, name: str = "train"):
    """Run `loop(config)` on `num_workers` Ray Train workers with a torch process group
    (gloo on CPU, nccl on GPU); returns Ray's Result. The one place that calls TorchTrainer."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=str(Path(storage_path).resolve())),
    )
    return trainer.fit()


def worker_runtime(*, ddp: bool = True):
    """This worker's `pipelines.train.Runtime`: rank, world size, device, DDP wrapper, reporter."""
    import ray.train
    import ray.train.torch

    from pipelines.train import Runtime

    ctx = ray.train.get_context()
    world = ctx.get_world_size()

    def wrap(model):
        return ray.train.torch.prepare_model(model, move_to_device=True) if (ddp and world > 1) else model

    return Runtime(rank=ctx.get_world_rank(), world=world, device=ray.train.torch.get_device(), wrap_model=wrap,
                   report=lambda metrics: ray.train.report(metrics))


def _train_worker(config: dict) -> None:
    import torch

    from pipelines.train import train_config_from_dict, train_loop

    cfg = train_config_from_dict(config["train"])
    torch.set_num_threads(cfg.torch_threads if cfg.torch_threads > 0 else max(1, int(cfg.cpus_per_worker)))
    train_loop(Path(config["run_dir"]), cfg, worker_runtime())


def train_ray(run_dir: Path, cfg, *, ray_address: str = "") -> dict:
    """Fine-tune on Ray Train with cfg.num_workers workers; returns the last epoch's metrics."""
    import dataclasses

    from pipelines.train import train_dir

    from .ray_runtime import init_ray

    init_ray(ray_address)
    out = train_dir(Path(run_dir), cfg)
    conf = dataclasses.asdict(cfg)
    # workers may run in another working directory: hand them absolute paths
    conf["out"] = str(out.resolve())
    conf["images"] = str(Path(cfg.images).resolve()) if cfg.images else ""
    if Path(cfg.weights).is_file():
        conf["weights"] = str(Path(cfg.weights).resolve())
    result = run_workers(_train_worker, {"run_dir": str(Path(run_dir).resolve()), "train": conf},
                         num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
                         storage_path=out / "ray", name="finetune")
    if result.error is not None:
        raise result.error
    log_path = out / "metrics.jsonl"  # rank 0's per-epoch log (Ray keeps metrics only with its own checkpoints)
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()] if log_path.is_file() else []
    return json.loads(lines[-1]) if lines else {}
