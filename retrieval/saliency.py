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


def egm_components(saliency: torch.Tensor | np.ndarray, **egm_kw) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """Regions (y0, x0, h, w) in map cells of the EGM components of one (H, W) saliency map, by decreasing
    weight, and their mixture weights (R,) (summing to 1); the whole map (weight 1) when the map is
    empty. egm_kw go to `retrieval.egm.egm`."""
    f = saliency.detach().cpu().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    f = np.nan_to_num(f.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    m = egm(f, **egm_kw)
    if len(m) == 0:
        return [(0, 0, f.shape[0], f.shape[1])], np.ones(1)
    return [(int(y0), int(x0), int(y1 - y0), int(x1 - x0)) for y0, x0, y1, x1 in m.boxes(f.shape)], m.weights


def egm_regions(saliency: torch.Tensor | np.ndarray, **egm_kw) -> list[tuple[int, int, int, int]]:
    """The regions of `egm_components`."""
    return egm_components(saliency, **egm_kw)[0]


def os_map(fmap: torch.Tensor, fs: torch.Tensor, search, f: np.ndarray, g: np.ndarray, *, k: int = 10,
           exclude: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """Object-saliency map (Simeoni et al.) of one image: S(p) = F^(p) sum_{i in N_p} sim(v_i, u_p) f_i g_i.

    Args:
        fmap: (C, H, W) activations; u_p is the L2-normalised activation vector at p.
        fs: (H, W) its FS map; F^ = fs / max(fs).
        search: `search(U, k) -> (D, I)` over the collection's M regional vectors v_i (inner product).
        f: (M,) diffusion scores of the regions for this image's regions (local search);
        g: (M,) global centrality of the regions.
        k: neighbours N_p of each position; exclude: region rows left out of N_p (the image's own:
            otherwise every position finds itself and the map stays the FS map).
    Returns: (H, W) float64, non-negative.
    """
    C, H, W = fmap.shape
    U = fmap.reshape(C, H * W).T
    U = (U / (torch.linalg.vector_norm(U, dim=1, keepdim=True) + eps)).detach().cpu().numpy().astype(np.float32)
    excl = np.asarray(exclude if exclude is not None else [], np.int64)
    D, I = search(U, k + len(excl))
    ok = (I >= 0) & ~np.isin(I, excl)
    ok &= np.cumsum(ok, axis=1) <= k  # the first k neighbours that are not excluded
    Ic = np.where(ok, I, 0)
    contrib = np.where(ok, np.maximum(D, 0.0) * f[Ic] * g[Ic], 0.0).sum(axis=1)
    F = fs.detach().cpu().numpy().astype(np.float64).reshape(H * W)
    F = F / max(F.max(), eps)
    return (F * contrib).reshape(H, W)


def box_precision(S: np.ndarray, box: tuple[float, float, float, float]) -> float:
    """Share of a (H, W) saliency map's mass inside box (y0, x0, y1, x1) in map cells (fractional
    boundaries: a cell counts by the fraction of it the box covers). 0 for an empty map."""
    H, W = S.shape
    y0, x0, y1, x1 = box
    ry = np.clip(np.minimum(np.arange(1, H + 1), y1) - np.maximum(np.arange(H), y0), 0, 1)
    rx = np.clip(np.minimum(np.arange(1, W + 1), x1) - np.maximum(np.arange(W), x0), 0, 1)
    total = float(S.sum())
    return float((S * np.outer(ry, rx)).sum() / total) if total > 0 else 0.0
