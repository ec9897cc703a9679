"""Expanding Gaussian mixtures (EGM) on a 2-D function: regions of a saliency map, their number found.

Our reading of the method (Avrithis and Kalantidis, "Approximate Gaussian Mixtures for large scale
vocabularies", ECCV 2012, generalised by Simeoni et al. from points to 2-D functions):

- The map f(p) >= 0 over pixel positions p is taken as a (weighted) density: every EM sum over data
  points becomes a sum over pixels weighted by f(p).
- **Start many, small**: one component per pixel of a regular sub-grid where f is non-zero, each with
  a small isotropic covariance sigma0^2 I and weight proportional to f there. The number of
  components is an upper bound that the purge step brings down.
- **E-step**: responsibilities r_k(p) = pi_k N(p | mu_k, S_k) / sum_j pi_j N(p | mu_j, S_j).
- **M-step with expansion**: w_k = sum_p f(p) r_k(p); pi_k = w_k / sum w; mu_k and S_k the f r_k-
  weighted mean and covariance; then S_k is *over-estimated*, S_k <- (1 + expand) S_k, so that
  components grow towards empty space and run into their neighbours.
- **P-step (purge)**: the L2 inner product of two weighted Gaussians is closed-form,
  <p_i, p_j> = pi_i pi_j N(mu_i | mu_j, S_i + S_j). Visiting components by decreasing weight and
  keeping a set K, component i is kept when it explains itself better than K does,
  rho_i = <p_i, p_i> / (<p_i, p_i> + sum_{j in K} <p_i, p_j>) >= purge; otherwise it is redundant and
  removed (its mass is taken over by the others at the next E-step).
- Iterate until the set of components and their means stop changing. Each surviving component is an
  ellipse (mean, covariance); its box is the ellipse at `radius` standard deviations, clipped to the map.

Pure numpy; (H, W) maps of feature-map size (tens of pixels a side) take milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Mixture:
    """EGM result: K components with weights (K,), means (K, 2) as (row, col) and covariances (K, 2, 2)."""

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    iterations: int

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    def boxes(self, shape: tuple[int, int], *, radius: float = 2.0) -> np.ndarray:
        """(K, 4) int boxes (y0, x0, y1, x1), end-exclusive, of each ellipse at `radius` std devs, in the map."""
        h, w = shape
        out = np.empty((len(self), 4), dtype=np.int64)
        for k, (m, c) in enumerate(zip(self.means, self.covs)):
            ry, rx = radius * math.sqrt(max(c[0, 0], 0.0)), radius * math.sqrt(max(c[1, 1], 0.0))
            y0 = int(np.clip(math.floor(m[0] - ry + 0.5), 0, h - 1))
            x0 = int(np.clip(math.floor(m[1] - rx + 0.5), 0, w - 1))
            y1 = int(np.clip(math.ceil(m[0] + ry + 0.5), y0 + 1, h))
            x1 = int(np.clip(math.ceil(m[1] + rx + 0.5), x0 + 1, w))
            out[k] = (y0, x0, y1, x1)
        return out


def _gauss(P: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """(K, N) densities N(P_n | mu_k, S_k) for positions P (N, 2)."""
    inv = np.linalg.inv(covs)  # (K, 2, 2)
    det = np.linalg.det(covs)
    d = P[None, :, :] - means[:, None, :]  # (K, N, 2)
    m = np.einsum("kni,kij,knj->kn", d, inv, d)
    return np.exp(-0.5 * m) / (2 * math.pi * np.sqrt(det))[:, None]


def overlaps(weights: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """(K, K) L2 inner products <p_i, p_j> = pi_i pi_j N(mu_i | mu_j, S_i + S_j) of weighted Gaussians."""
    S = covs[:, None] + covs[None, :]  # (K, K, 2, 2)
    d = means[:, None] - means[None, :]  # (K, K, 2)
    inv = np.linalg.inv(S)
    m = np.einsum("abi,abij,abj->ab", d, inv, d)
    g = np.exp(-0.5 * m) / (2 * math.pi * np.sqrt(np.linalg.det(S)))
    return weights[:, None] * weights[None, :] * g


def purge(weights: np.ndarray, means: np.ndarray, covs: np.ndarray, *, threshold: float) -> np.ndarray:
    """Indices of the components kept by the P-step, visiting them by decreasing weight."""
    O = overlaps(weights, means, covs)
    kept: list[int] = []
    for i in np.argsort(-weights, kind="stable"):
        rho = O[i, i] / (O[i, i] + O[i, kept].sum()) if kept else 1.0
        if rho >= threshold:
            kept.append(int(i))
    return np.asarray(sorted(kept), dtype=np.int64)


def egm(f: np.ndarray, *, sigma0: float = 1.0, expand: float = 0.25, purge_threshold: float = 0.55,
        floor: float = 0.1, max_init: int = 256, min_weight: float = 0.02, max_iter: int = 60,
        tol: float = 1e-3, reg: float = 0.05) -> Mixture:
    """Expanding Gaussian mixture fitted to a non-negative (H, W) map.

    Values below `floor` x max are set to zero first (a saliency map's flat background is not an
    object). Components start on a sub-grid of at most `max_init` non-zero pixels with covariance
    sigma0^2 I; `expand` over-estimates covariances at each M-step; `purge_threshold` is the self-
    responsibility a component needs to survive; `reg` (pixels^2) is added to covariances so a component
    on one pixel stays a valid Gaussian. Components with final weight below `min_weight` are dropped.
    An all-zero map gives an empty mixture.
    """
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"egm: expected an (H, W) map, got shape {f.shape}")
    if not np.isfinite(f).all() or (f < 0).any():
        raise ValueError("egm: the map must be finite and non-negative")
    h, w = f.shape
    top = f.max() if f.size else 0.0
    if top <= 0:
        return Mixture(np.zeros(0), np.zeros((0, 2)), np.zeros((0, 2, 2)), 0)
    f = np.where(f >= floor * top, f - floor * top, 0.0)
    f = f / f.sum()
    yy, xx = np.mgrid[0:h, 0:w]
    P = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)  # (N, 2) row, col
    fv = f.ravel()
    support = np.flatnonzero(fv > 0)
    P, fv = P[support], fv[support]
    stride = max(1, int(math.ceil(math.sqrt(len(support) / max_init))))
    init = np.flatnonzero((P[:, 0] % stride == 0) & (P[:, 1] % stride == 0))
    if len(init) == 0:
        init = np.array([int(np.argmax(fv))])
    means = P[init].copy()
    covs = np.repeat((sigma0 ** 2 * np.eye(2))[None], len(init), axis=0)
    weights = fv[init] / fv[init].sum()
    eye = reg * np.eye(2)
    it = 0
    for it in range(1, max_iter + 1):
        # E-step
        dens = weights[:, None] * _gauss(P, means, covs)  # (K, N)
        dens /= np.maximum(dens.sum(axis=0, keepdims=True), 1e-300)
        # M-step, with expansion
        R = dens * fv[None, :]
        wk = R.sum(axis=1)
        live = wk > 1e-12
        R, wk = R[live], wk[live]
        new_means = (R @ P) / wk[:, None]
        d = P[None, :, :] - new_means[:, None, :]
        new_covs = np.einsum("kn,kni,knj->kij", R, d, d) / wk[:, None, None]
        new_covs = (1.0 + expand) * new_covs + eye
        new_weights = wk / wk.sum()
        # P-step
        keep = purge(new_weights, new_means, new_covs, threshold=purge_threshold)
        moved = np.abs(new_means[keep] - means[live][keep]).max() if len(keep) else 0.0
        changed = len(keep) != len(means)
        means, covs = new_means[keep], new_covs[keep]
        weights = new_weights[keep] / new_weights[keep].sum()
        if not changed and moved < tol:
            break
    big = weights >= min_weight
    order = np.argsort(-weights[big], kind="stable")
    wts = weights[big][order]
    return Mixture(wts / wts.sum(), means[big][order], covs[big][order], it)
