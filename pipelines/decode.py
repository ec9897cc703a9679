"""Image bytes -> pixels: decoding, cropping and resizing, without torch.

Ray Data's decode tasks import this module (through `prepare`) and nothing heavier: importing torch
costs a fresh process 1.75-2.5 s here, which a worker that only decodes does not need (BENCHMARKS.md,
extraction's start-up: where decoding is fused into the model actors, which load torch anyway, the
start-up did not change).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from .config import ExtractConfig


def open_rgb(data: bytes, bbox: Sequence[float] | None = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image, cropped to bbox (x0, y0, x1, y1) when given."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode == "RGB":  # decoded as it is (convert would return a copy)
            im.load()
        else:
            im = im.convert("RGB")
    if bbox is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in bbox)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(max(x1, x0 + 1), im.width), min(max(y1, y0 + 1), im.height)
        im = im.crop((x0, y0, x1, y1))
    return im


def fit(w: int, h: int, side: int) -> tuple[int, int]:
    """(width, height) of a w x h image scaled, aspect kept, so that its longer side is `side`."""
    s = side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def to_input(im: Image.Image | np.ndarray, *, max_side: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB image (PIL, or (H, W, 3) uint8 pixels as `prepare` gives them) resized (aspect kept) so its
    longer side is max_side -> (3, H, W) float32, normalised by the backbone's per-channel `mean` and
    `std` (of pixels in [0, 1]). Pixels already at that size go to the arithmetic as they are."""
    w, h = (im.shape[1], im.shape[0]) if isinstance(im, np.ndarray) else im.size
    size = fit(w, h, max_side)
    if size != (w, h):
        im = (Image.fromarray(im) if isinstance(im, np.ndarray) else im).resize(size, Image.BILINEAR)
    # channels first before the arithmetic, in place: each channel is one contiguous plane (broadcasting
    # over a last axis of 3 took twice as long); the same operations, so the same bits
    a = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
    a /= 255.0
    a -= np.asarray(mean, np.float32)[:, None, None]
    a /= np.asarray(std, np.float32)[:, None, None]
    return a


def prepare(data: bytes, bbox: Sequence[float] | None, cfg: ExtractConfig) -> tuple[np.ndarray, np.ndarray]:
    """Decode, crop to bbox and resize to the largest scale's side (CPU work that can run apart from
    the model). Returns (H, W, 3) uint8 pixels and geometry (width, height, x0, y0) of the crop in
    the original image."""
    im = open_rgb(data, bbox)
    side = max(8, round(cfg.max_side * max(cfg.scales)))
    size = fit(im.width, im.height, side)
    ox, oy = (max(0.0, float(bbox[0])), max(0.0, float(bbox[1]))) if bbox is not None else (0.0, 0.0)
    out = im.resize(size, Image.BILINEAR) if size != im.size else im
    return np.asarray(out, dtype=np.uint8), np.array([im.width, im.height, ox, oy], np.float32)
