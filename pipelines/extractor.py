"""Image bytes -> global descriptors with a CNN backbone and pooling (shared by every engine)."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch

from retrieval.backbones import fold_batchnorm
from retrieval.pooling import egm_regional, l2n, make_pooling, rmac_regional, sum_regions
from retrieval.saliency import fs_map

from .allocator import keep_freed_memory
from .config import ExtractConfig
from .decode import open_rgb, prepare, to_input
from .models import load_backbone

log = logging.getLogger(__name__)


def torch_device(name: str) -> torch.device:
    """"auto" -> cuda when this process sees a GPU, else cpu; "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("extract: device = \"cuda\" but this process sees no GPU (use \"auto\" or \"cpu\")")
    return torch.device(name)


def forward_threads(cfg: ExtractConfig, processes: int = 1) -> int:
    """Torch threads of each of `processes` forward passes: `torch_threads` when set, else the CPUs
    the extraction's actors hold together, shared among them (a Ray actor's torch uses the CPUs it
    was given)."""
    return cfg.torch_threads if cfg.torch_threads > 0 else max(1, int(round(cfg.actor_num_cpus * cfg.actors / processes)))


def forward_processes(cfg: ExtractConfig) -> int:
    """Forward passes the extraction runs side by side: one per model actor for the Ray engines on a
    CPU (on a GPU the actors sit on different devices, so one process is the reference), else one."""
    return cfg.actors if cfg.engine != "local" and torch_device(cfg.device).type == "cpu" else 1


def raw_forward_rate(cfg: ExtractConfig, images: Sequence[bytes], *, threads: int | None = None,
                     processes: int | None = None) -> float:
    """Images/s of the model's forward pass and pooling alone on `images` (decoded and resized
    beforehand, one warm-up pass first): the rate extraction would reach if reading, decoding and
    writing cost nothing. With `processes` > 1 (default `forward_processes`) the images are dealt
    to that many spawned processes, started together: images over the wall time of all of them,
    the reference for model actors working side by side; one process runs in this process. Each
    process forwards on `threads` torch threads (default `forward_threads`: the actors' CPUs shared
    among the processes)."""
    if not images:
        raise ValueError("raw_forward_rate: no images")
    procs = min(processes or forward_processes(cfg), len(images))
    per = threads or forward_threads(cfg, procs)
    if procs <= 1:
        n, t0, t1 = _timed_forward(cfg, images, per)
        return n / (t1 - t0)
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_forward_worker, args=(cfg, list(images[i::procs]), per, barrier, results), daemon=True)
               for i in range(procs)]
    for w in workers:
        w.start()
    try:
        got = [_next_result(results, workers) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=30)
    # a failed process breaks the barrier for the others: report the failure, not the broken barrier
    errors = sorted((g for g in got if isinstance(g, str)), key=lambda e: e.startswith("BrokenBarrierError"))
    if errors:
        raise RuntimeError(f"raw_forward_rate: a forward process failed: {errors[0]}")
    return sum(g[0] for g in got) / (max(g[2] for g in got) - min(g[1] for g in got))


BARRIER_TIMEOUT_S = 600.0  # the forward processes wait this long for each other to be ready


def _next_result(results, workers) -> tuple[int, float, float] | str:
    """The next worker's result; a clear error when every worker has exited without one."""
    import queue

    while True:
        alive = any(w.is_alive() for w in workers)
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            if not alive:
                codes = [w.exitcode for w in workers]
                raise RuntimeError(f"raw_forward_rate: the forward processes exited without a result (exit codes {codes})") from None


def _timed_forward(cfg: ExtractConfig, images: Sequence[bytes], threads: int, barrier=None) -> tuple[int, float, float]:
    """(images, start, end) of the forward pass and pooling over `images` on `threads` torch threads,
    wall-clock times taken after the inputs are prepared, the warm-up passed and `barrier` crossed."""
    ex = DescriptorExtractor(cfg)
    inputs = [torch.from_numpy(to_input(open_rgb(b), max_side=cfg.max_side, mean=ex.model.input_mean, std=ex.model.input_std))[None]
              for b in images]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ex.features(inputs[0])
            if barrier is not None:  # a sibling that never arrives (killed with its parent) breaks it, not waits forever
                barrier.wait(timeout=BARRIER_TIMEOUT_S)
            t0 = time.time()
            for x in inputs:
                l2n(ex.pool(ex.features(x)))
            return len(inputs), t0, time.time()
    finally:
        torch.set_num_threads(prev)


def _forward_worker(cfg: ExtractConfig, images: list[bytes], threads: int, barrier, results) -> None:
    """A spawned process of `raw_forward_rate`: puts its (images, start, end), or its error as one line."""
    try:
        results.put(_timed_forward(cfg, images, threads, barrier))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        barrier.abort()
        results.put(f"{type(e).__name__}: {e}")


class DescriptorExtractor:
    """Callable: batch of image bytes (+ optional boxes) -> (B, C) float32 L2-normalised descriptors.

    Images keep their aspect ratio and are forwarded one by one (sizes differ), without grad.
    """

    def __init__(self, cfg: ExtractConfig):
        self.cfg = cfg
        keep_freed_memory()  # else each image's activations are paged in afresh (pipelines/allocator.py)
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        self.model, self.info = load_backbone(cfg.backbone, cfg.weights)
        self.device = torch_device(cfg.device)
        kw = {"p": cfg.gem_p} if cfg.pooling == "gem" else {"weighting": cfg.egm_weighting} if cfg.pooling == "fs_egm" else {}
        # a fine-tuned checkpoint carries its own head (learned GeM p, optional whitening layer)
        head = getattr(self.model, "retrieval_head", None)
        self.pool = head if head is not None else make_pooling(cfg.pooling, **kw)
        if head is not None and cfg.pooling != "gem":
            log.warning("extract: weights are a fine-tuned checkpoint; its learned GeM head replaces pooling=%r", cfg.pooling)
        fold_batchnorm(self.model)  # inference only: each BatchNorm folded into its convolution
        # on a CPU, convolutions in channels-last layout run faster (oneDNN's native layout)
        self.layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.model.to(self.device, memory_format=self.layout)
        if isinstance(self.pool, torch.nn.Module):
            self.pool.to(self.device)
        if not cfg.scales or any(s <= 0 for s in cfg.scales):
            raise ValueError(f"extract: scales must be positive, got {cfg.scales}")
        self._egm_once = head is None and cfg.pooling == "fs_egm" and cfg.region_kind == "fs_egm"
        self._forward_cpu_s, self._forward_images = 0.0, 0  # see `forward_clock`

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) normalised RGB (any device, any layout) -> the backbone's (1, C, h, w) maps on
        the extractor's device, in the ordinary contiguous layout."""
        return self.model.features(x.to(self.device).contiguous(memory_format=self.layout)).contiguous()

    def forward_clock(self) -> tuple[float, int] | None:
        """(CPU seconds spent in the forward passes and the global pooling, as `raw_forward_rate` times
        them, images embedded) since this extractor was built: the model's own rate in the middle of
        an extraction, which the machine's drift
        slows exactly as it slows the extraction around it (a process that other work preempts
        keeps its CPU time). None where that CPU time is not the forward pass's cost: on a GPU
        (kernels run asynchronously) or with torch on several threads (the calling thread's clock
        misses the others')."""
        if self.device.type != "cpu" or torch.get_num_threads() != 1:
            return None
        return self._forward_cpu_s, self._forward_images

    @property
    def dim(self) -> int:
        return int(getattr(self.pool, "out_dim", self.model.out_channels))

    def __call__(self, images: Sequence[bytes], boxes: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
        """(B, C) float32 L2-normalised global descriptors."""
        return self.extract(images, boxes)["vector"]

    def extract(self, images: Sequence[bytes], boxes: Sequence[Sequence[float] | None] | None = None) -> dict:
        """{"vector": (B, C) float32} plus, with cfg.regions, "regions": per image (R, C) float32
        L2-normalised R-MAC regional vectors of the first scale and "region_boxes": per image (R, 4)
        float32 (x0, y0, x1, y1) in pixels of the original image."""
        boxes = boxes if boxes is not None else [None] * len(images)
        prepared = [prepare(d, b, self.cfg) for d, b in zip(images, boxes)]
        return self.embed([p for p, _ in prepared], [g for _, g in prepared])

    @torch.no_grad()
    def embed(self, pixels: Sequence[np.ndarray], geoms: Sequence[Sequence[float]], ids: Sequence[int] | None = None) -> dict:
        """Descriptors from `prepare`d images: (H, W, 3) uint8 arrays and their geometry (`ids`, the
        images' ids, are for extractors whose output depends on the image's place in the collection)."""
        out = np.empty((len(pixels), self.dim), dtype=np.float32)
        regions, region_boxes = [], []
        for i, (px, geom) in enumerate(zip(pixels, geoms)):
            im = np.asarray(px, dtype=np.uint8)  # to_input resizes it only for a scale that needs it
            vs = []
            for si, s in enumerate(self.cfg.scales):
                x = torch.from_numpy(to_input(im, max_side=max(8, round(self.cfg.max_side * s)),
                                              mean=self.model.input_mean, std=self.model.input_std))[None]
                t = time.thread_time()  # the forward pass and the global vector's pooling: `forward_clock`
                fmap = self.features(x)
                regional_here = self.cfg.regions and si == 0
                egm = regional_here and self._egm_once
                if egm:  # the FS.EGM vector is the sum of these very regions: one EGM fit serves both
                    vecs, regs, wts = egm_regional(fmap, fs_map(fmap), weights=True)
                    vs.append(l2n(sum_regions(vecs, wts, weighting=self.cfg.egm_weighting))[0])
                else:
                    vs.append(l2n(self.pool(fmap))[0])
                self._forward_cpu_s += time.thread_time() - t
                if regional_here:
                    r, b = region_boxes_of(fmap, vecs[0], regs[0], geom) if egm else regional(fmap, geom, kind=self.cfg.region_kind)
                    regions.append(r)
                    region_boxes.append(b)
            out[i] = combine_scales(torch.stack(vs), p=self.cfg.scale_p).cpu().numpy()
        self._forward_images += len(pixels)
        res = {"vector": out}
        if self.cfg.regions:
            res["regions"], res["region_boxes"] = regions, region_boxes
        return res


def regional(fmap: torch.Tensor, geom: Sequence[float], *, kind: str = "rmac") -> tuple[np.ndarray, np.ndarray]:
    """Regional vectors (R, C) of one (1, C, H, W) feature map and their boxes (R, 4) in original-image
    pixels; geom = (width, height, x0, y0) of the image region the map covers. kind "rmac": the R-MAC
    grid; "fs_egm": the EGM regions of the map's FS saliency."""
    if kind == "fs_egm":
        vecs, regs = egm_regional(fmap, fs_map(fmap))
        return region_boxes_of(fmap, vecs[0], regs[0], geom)
    v, regs = rmac_regional(fmap, include_global=False)
    return region_boxes_of(fmap, v[0], regs, geom)


def region_boxes_of(fmap: torch.Tensor, vecs: torch.Tensor, regs, geom: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(R, C) regional vectors as float32 numpy and their regions [(y0, x0, h, w)] in map cells of
    `fmap` as (R, 4) boxes (x0, y0, x1, y1) in original-image pixels (geom as in `regional`)."""
    h, w = fmap.shape[-2:]
    sx, sy = float(geom[0]) / w, float(geom[1]) / h
    ox, oy = float(geom[2]), float(geom[3])
    b = np.array([[x0 * sx + ox, y0 * sy + oy, (x0 + rw) * sx + ox, (y0 + rh) * sy + oy] for y0, x0, rh, rw in regs], np.float32)
    return vecs.cpu().numpy().astype(np.float32), b.reshape(-1, 4)


def combine_scales(v: torch.Tensor, *, p: float = 1.0) -> torch.Tensor:
    """(S, C) per-scale L2-normalised descriptors -> generalised mean over scales, L2-normalised (C,)."""
    if v.shape[0] == 1:
        return v[0]
    return l2n(v.clamp(min=0).pow(p).mean(dim=0).pow(1.0 / p)[None])[0]
