"""GPU code paths (issue 16): run wherever torch sees a CUDA device, skipped cleanly where none is.

    python -m pytest tests/cluster/test_gpu.py          # on a GPU machine (CUDA build of torch)

Extraction on the GPU equals extraction on the CPU; a Ray extraction actor given a GPU runs the
model there, and so do the warm model actors (`engine = "ray_actors"`), with the CPU's descriptors;
a Ray Train worker with use_gpu gets a CUDA device.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch (CPU machine or CPU build)")]


def _images(n: int = 6) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (96 + 8 * i, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_gpu_extraction_equals_cpu_extraction():
    from pipelines.config import ExtractConfig
    from pipelines.extractor import DescriptorExtractor

    cfg = dict(max_side=96, scales=[1.0, 0.7071], regions=True)
    gpu = DescriptorExtractor(ExtractConfig(device="cuda", **cfg))
    cpu = DescriptorExtractor(ExtractConfig(device="cpu", **cfg))
    assert next(gpu.model.parameters()).is_cuda and gpu.device.type == "cuda"
    a, b = gpu.extract(_images()), cpu.extract(_images())
    np.testing.assert_allclose(a["vector"], b["vector"], atol=2e-3)
    for ra, rb in zip(a["regions"], b["regions"]):
        np.testing.assert_allclose(ra, rb, atol=2e-3)


def test_auto_device_picks_the_gpu():
    from pipelines.extractor import torch_device

    assert torch_device("auto").type == "cuda"


def test_ray_extraction_actor_runs_on_its_gpu(ray_session):
    import ray

    from pipelines.config import ExtractConfig

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the embedded Ray sees no GPU")

    @ray.remote(num_gpus=1, num_cpus=0.5)
    def device_of_extractor() -> str:
        from pipelines.extractor import DescriptorExtractor

        return str(next(DescriptorExtractor(ExtractConfig(max_side=64)).model.parameters()).device)

    assert ray.get(device_of_extractor.remote(), timeout=300).startswith("cuda")


def test_warm_model_actors_run_on_their_gpus_and_match_the_cpu(ray_session):
    """The ray_actors engine: each model actor gets a GPU (one per actor) and its descriptors equal
    the CPU's."""
    import functools

    import ray

    from cluster.extract_actors import NAMESPACE, pool_names, stop_pool, warm_pool
    from pipelines.config import ExtractConfig
    from pipelines.decode import prepare
    from pipelines.extractor import DescriptorExtractor

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the embedded Ray sees no GPU")
    cfg = ExtractConfig(max_side=96, engine="ray_actors", actors=1, actor_num_cpus=0.5, keep_actors=True)
    try:
        warm_pool(functools.partial(DescriptorExtractor, cfg), functools.partial(prepare, cfg=cfg), actors=1, num_cpus=0.5)
        (name,) = pool_names()
        actor = ray.get_actor(name, namespace=NAMESPACE)
        assert ray.get(actor.device.remote(), timeout=300).startswith("cuda")
        imgs = _images()
        batch = {"path": np.array(["x"] * len(imgs), dtype=object), "id": np.arange(len(imgs)),
                 "image": np.array(imgs + [None], dtype=object)[:-1]}
        got = ray.get(actor.run.remote(batch), timeout=300)
        cpu = DescriptorExtractor(ExtractConfig(max_side=96, device="cpu")).extract(imgs)
        assert got["ok"].all()
        np.testing.assert_allclose(got["vector"], cpu["vector"], atol=2e-3)
    finally:
        stop_pool()


def test_ray_train_worker_gets_a_cuda_device(ray_session, tmp_path):
    import ray

    from cluster.ray_train import run_workers, worker_context

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the embedded Ray sees no GPU")

    def loop(config: dict) -> None:
        ctx = worker_context()
        x = torch.ones(4, device=ctx.device)
        ctx.report({"device": ctx.device.type, "sum": float(x.sum())})

    res = run_workers(loop, {}, num_workers=1, use_gpu=True, cpus_per_worker=0.5, storage_path=tmp_path)
    assert res.metrics["device"] == "cuda" and res.metrics["sum"] == 4.0
