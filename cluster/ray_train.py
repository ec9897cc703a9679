"""Ray Train wiring: a TorchTrainer runs a training loop on `num_workers` DDP workers (one per GPU
on a cluster, CPU workers with gloo here).

Thin and generic: the loop is a callable handed in by the caller (the train stage's, in
pipelines/train.py), as extraction hands its callables to Ray actors; this module only starts the
workers and gives each loop its `WorkerContext` (rank, world size, device, DDP wrapper, reporter
forwarding metrics to `ray.train.report`). Whatever the loop writes must go to storage every node
shares.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    """Where a Ray Train worker runs: its rank and the world size of the process group, its torch
    device, how to wrap a model for DDP, and how to report metrics (`ray.train.report`)."""

    rank: int
    world: int
    device: Any  # torch.device
    wrap_model: Callable[[Any], Any]
    report: Callable[[dict], None]


def run_workers(loop: Callable[[dict], None], config: dict, *, num_workers: int, use_gpu: bool = False,
                cpus_per_worker: float = 1.0, storage_path: str | Path, name: str = "train"):
    """Run `loop(config)` on `num_workers` Ray Train workers with a torch process group
    (gloo on CPU, nccl on GPU); returns Ray's Result. The one place that calls TorchTrainer."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .ray_runtime import require_ray

    require_ray("fine-tuning (train engine = ray)")
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


def worker_context(*, ddp: bool = True) -> WorkerContext:
    """This worker's context (call it inside a loop run by `run_workers`); with ddp and more than
    one worker, `wrap_model` returns the model moved to the device and wrapped in DDP."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world = ctx.get_world_size()

    def wrap(model):
        return ray.train.torch.prepare_model(model, move_to_device=True) if (ddp and world > 1) else model

    return WorkerContext(rank=ctx.get_world_rank(), world=world, device=ray.train.torch.get_device(), wrap_model=wrap,
                         report=lambda metrics: ray.train.report(metrics))
