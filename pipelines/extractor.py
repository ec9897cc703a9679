"""Image bytes -> global descriptors with a CNN backbone and pooling (shared by every engine)."""
from __future__ import annotations

import io
import logging
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from retrieval.efficientnet_lite import INPUT_MEAN, INPUT_STD
from retrieval.pooling import l2n, make_pooling

from .config import ExtractConfig
from .models import load_backbone

log = logging.getLogger(__name__)


def decode(data: bytes, *, max_side: int, bbox: Sequence[float] | None = None) -> np.ndarray:
    """Encoded image -> (3, H, W) float32 normalised tensor data, cropped to bbox, longer side max_side."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if bbox is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in bbox)
            x0, y0 = max(x0, 0), max(y0, 0)
            x1, y1 = min(max(x1, x0 + 1), im.width), min(max(y1, y0 + 1), im.height)
            im = im.crop((x0, y0, x1, y1))
        s = max_side / max(im.size)
        size = (max(1, round(im.width * s)), max(1, round(im.height * s)))
        im = im.resize(size, Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - np.asarray(INPUT_MEAN, np.float32)) / np.asarray(INPUT_STD, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


class DescriptorExtractor:
    """Callable: batch of image bytes (+ optional boxes) -> (B, C) float32 L2-normalised descriptors.

    Images keep their aspect ratio and are forwarded one by one (sizes differ), without grad.
    """

    def __init__(self, cfg: ExtractConfig):
        self.cfg = cfg
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        self.model, self.info = load_backbone(cfg.backbone, cfg.weights)
        kw = {"p": cfg.gem_p} if cfg.pooling == "gem" else {}
        self.pool = make_pooling(cfg.pooling, **kw)

    @property
    def dim(self) -> int:
        return int(self.model.out_channels)

    @torch.no_grad()
    def __call__(self, images: Sequence[bytes], boxes: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
        boxes = boxes if boxes is not None else [None] * len(images)
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for i, (data, box) in enumerate(zip(images, boxes)):
            x = torch.from_numpy(decode(data, max_side=self.cfg.max_side, bbox=box))[None]
            out[i] = l2n(self.pool(self.model.features(x)))[0].numpy()
        return out
