"""Saliency maps of CNN activations and the regions they suggest.

- FS map (feature saliency, Simeoni et al.): channel weights as in CroW,
  w_k = -log(eps + |{p : A_k(p) > 0}| / (H W)), combined as in CAM, F(p) = sum_k w_k A_k(p). A channel
  active everywhere gets weight 0; sparse channels (parts of objects) dominate.
- EGM regions: boxes of the expanding Gaussian mixture (`retrieval.egm`) fitted to a map.

Pure torch/numpy on (B, C, H, W) activations; maps are (B, H, W) float32.
"""
from __future__ import annotations

import numpy as np
import torch

from .egm import egm


def fs_channel_weights(x: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """(B, C) weights w_k = -log(eps + fraction of locations where channel k is active) of (B, C, H, W) x."""
    frac = (x > 0).float().mean(dim=(-2, -1))
    return -torch.log(eps + frac)


def fs_map(x: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """(B, H, W) feature-saliency map F = sum_k w_k A_k of non-negative (B, C, H, W) activations."""
    return torch.einsum("bc,bchw->bhw", fs_channel_weights(x, eps=eps), x)


def egm_regions(saliency: torch.Tensor | np.ndarray, **egm_kw) -> list[tuple[int, int, int, int]]:
    """Regions (y0, x0, h, w) in map cells of the EGM components of one (H, W) saliency map, by decreasing
    weight; the whole map when the map is empty. egm_kw go to `retrieval.egm.egm`."""
    f = saliency.detach().cpu().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    f = np.nan_to_num(f.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    m = egm(f, **egm_kw)
    if len(m) == 0:
        return [(0, 0, f.shape[0], f.shape[1])]
    return [(int(y0), int(x0), int(y1 - y0), int(x1 - x0)) for y0, x0, y1, x1 in m.boxes(f.shape)]
