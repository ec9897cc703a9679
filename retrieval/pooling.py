"""Global pooling of CNN feature maps: pure functions with thin `nn.Module` wrappers.

All functions take (B, C, H, W) non-negative activations and return (B, C) descriptors
(not normalised; see `l2n`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .saliency import egm_components, fs_map


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: max over locations."""
    return torch.amax(x, dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled convolutional features (average over locations)."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, *, p: float | torch.Tensor = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean (Radenovic et al.): (mean x^p)^(1/p); p = 1 is SPoC, p -> inf is MAC."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2n(x: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise rows of (B, D)."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


class GeM(nn.Module):
    """GeM pooling with a fixed or learnable exponent p."""

    def __init__(self, *, p: float = 3.0, learnable: bool = False, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p))) if learnable else float(p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, p=self.p, eps=self.eps)


class MAC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)


class SPoC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC regions (Tolias et al., ICLR 2016) of an h x w feature map: (y0, x0, size, size).

    At level l (1..levels) square regions of side floor(2 min(h, w) / (l + 1)) are laid out
    uniformly, l along the short side and l + extra along the long side, where `extra` (0..5) makes
    consecutive level-1 regions overlap as close to `overlap` as possible.
    """
    short, long_ = min(h, w), max(h, w)
    extra = 0
    if long_ > short:
        best = None
        for steps in range(2, 8):
            b = (long_ - short) / (steps - 1)
            err = abs((short * short - short * b) / (short * short) - overlap)
            if best is None or err < best:
                best, extra = err, steps - 1
    out = []
    for l in range(1, levels + 1):
        side = int(2 * short // (l + 1))
        if side < 1:
            continue
        nh = l + (extra if h > w else 0)
        nw = l + (extra if w > h else 0)

        def starts(count: int, total: int) -> list[int]:
            if count == 1:
                return [0]
            step = (total - side) / (count - 1)
            return [int(math.floor(i * step)) for i in range(count)]

        for y in starts(nh, h):
            for x in starts(nw, w):
                out.append((y, x, side, side))
    return out


def rmac(x: torch.Tensor, *, levels: int = 3, eps: float = 1e-6, include_global: bool = True) -> torch.Tensor:
    """Regional MAC: sum of L2-normalised MAC vectors over the R-MAC regions (and the whole map)."""
    return rmac_regional(x, levels=levels, eps=eps, include_global=include_global)[0].sum(dim=1)


def rmac_regional(x: torch.Tensor, *, levels: int = 3, eps: float = 1e-6, include_global: bool = True):
    """Per-region L2-normalised MAC vectors (B, R, C) and the regions [(y0, x0, h, w)] (feature map units)."""
    h, w = x.shape[-2:]
    regions = ([(0, 0, h, w)] if include_global else []) + rmac_regions(h, w, levels)
    vecs = [l2n(mac(x[..., y : y + rh, x0 : x0 + rw]), eps=eps) for y, x0, rh, rw in regions]
    return torch.stack(vecs, dim=1), regions


def crow(x: torch.Tensor, *, a: float = 2.0, b: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """CroW (Kalantidis et al. 2016): spatial weights from normalised summed activations, channel
    weights from the inverse log sparsity of each channel; sum-pooled with both."""
    S = x.sum(dim=1, keepdim=True)  # (B, 1, H, W)
    z = torch.linalg.vector_norm(S.flatten(1), ord=a, dim=1).view(-1, 1, 1, 1)
    S = (S / (z + eps)).pow(1.0 / b)
    v = (x * S).sum(dim=(-2, -1))  # (B, C)
    return v * _idf_channel_weights(x, eps=eps)


def _idf_channel_weights(x: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """w_k = log(sum_j Q_j / (eps + Q_k)), Q_k the fraction of locations where channel k is active (CroW)."""
    Q = (x > 0).float().mean(dim=(-2, -1))  # (B, C)
    return torch.log(Q.sum(dim=1, keepdim=True) / (eps + Q) + eps)


def fs_pooling(x: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Feature-saliency pooling: the FS map (`retrieval.saliency.fs_map`) normalised to [0, 1] weights the
    sum over locations of the activations."""
    F_map = fs_map(x, eps=eps)
    F_map = F_map / (F_map.amax(dim=(-2, -1), keepdim=True) + eps)
    return torch.einsum("bhw,bchw->bc", F_map, x)


def regional_mac(x: torch.Tensor, regions: list[tuple[int, int, int, int]], *, eps: float = 1e-6) -> torch.Tensor:
    """(R, C) L2-normalised MAC vectors of one (C, H, W) map over regions (y0, x0, h, w)."""
    return torch.stack([l2n(mac(x[:, y : y + h, x0 : x0 + w])[None], eps=eps)[0] for y, x0, h, w in regions])


def egm_regional(x: torch.Tensor, saliency: torch.Tensor, *, eps: float = 1e-6, weights: bool = False, **egm_kw):
    """Per image of (B, C, H, W) x: (R_b, C) L2-normalised MAC vectors over the EGM regions of its (H, W)
    saliency map, and the regions [(y0, x0, h, w)] in map cells (two lists of length B); with
    weights=True also the regions' mixture weights (a third list, (R_b,) each)."""
    vecs, regs, wts = [], [], []
    for b in range(x.shape[0]):
        r, w = egm_components(saliency[b], **egm_kw)
        vecs.append(regional_mac(x[b], r, eps=eps))
        regs.append(r)
        wts.append(w)
    return (vecs, regs, wts) if weights else (vecs, regs)


EGM_WEIGHTINGS: tuple[str, ...] = ("equal", "mass")


def fs_egm(x: torch.Tensor, *, eps: float = 1e-6, weighting: str = "equal", **egm_kw) -> torch.Tensor:
    """FS.EGM (Simeoni et al.): EGM regions of the FS map, max-pooled each, L2-normalised and summed as in
    R-MAC. (B, C, H, W) -> (B, C), not normalised."""
    return egm_pooling(x, fs_map(x, eps=eps), eps=eps, weighting=weighting, **egm_kw)


def egm_pooling(x: torch.Tensor, saliency: torch.Tensor, *, eps: float = 1e-6, weighting: str = "equal", **egm_kw) -> torch.Tensor:
    """EGM regions of a (B, H, W) saliency map, regional MAC L2-normalised and summed: FS.EGM with the FS
    map, OS.EGM with the object-saliency map. weighting "equal": a plain sum, as R-MAC; "mass": each
    region weighted by its component's share of the map's mass. (B, C, H, W) -> (B, C), not normalised."""
    if weighting not in EGM_WEIGHTINGS:
        raise ValueError(f"unknown EGM region weighting {weighting!r}; known: {list(EGM_WEIGHTINGS)}")
    vecs, _, wts = egm_regional(x, saliency, eps=eps, weights=True, **egm_kw)
    return sum_regions(vecs, wts, weighting=weighting)


def sum_regions(vecs: list[torch.Tensor], wts: list, *, weighting: str = "equal") -> torch.Tensor:
    """Per image (R_b, C) regional vectors and (R_b,) mixture weights (as `egm_regional` gives
    them) -> (B, C) their sum, plain ("equal") or weighted by the weights ("mass")."""
    if weighting == "equal":
        return torch.stack([v.sum(dim=0) for v in vecs])
    return torch.stack([(torch.as_tensor(w, dtype=v.dtype, device=v.device)[:, None] * v).sum(dim=0) for v, w in zip(vecs, wts)])


class RMAC(nn.Module):
    def __init__(self, *, levels: int = 3):
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmac(x, levels=self.levels)


class CroW(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return crow(x)


class FS(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fs_pooling(x)


class FSEGM(nn.Module):
    def __init__(self, *, weighting: str = "equal"):
        super().__init__()
        if weighting not in EGM_WEIGHTINGS:
            raise ValueError(f"unknown EGM region weighting {weighting!r}; known: {list(EGM_WEIGHTINGS)}")
        self.weighting = weighting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fs_egm(x, weighting=self.weighting)


POOLINGS = {"mac": MAC, "spoc": SPoC, "gem": GeM, "rmac": RMAC, "crow": CroW, "fs": FS, "fs_egm": FSEGM}


def make_pooling(name: str, **kwargs) -> nn.Module:
    """Pooling module by name (mac, spoc, gem, rmac, crow, fs, fs_egm); kwargs go to its constructor."""
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; known: {sorted(POOLINGS)}")
    return POOLINGS[name](**kwargs)
