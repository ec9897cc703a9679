"""Descriptor-level synthetic manifolds for scale experiments (no images needed).

Each class is a long curved 1-D manifold (a random trigonometric curve through R^d) on the unit
sphere; classes overlap (their curves pass close to each other) and distractor curves with no
queries lie among them, plus background points scattered near the manifolds. A query is a noisy
point of a class curve; its positives are all points of that class. Far along its curve a class is
far from the query in Euclidean terms, which is what diffusion on the kNN graph recovers and what
plain kNN misses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ManifoldSpec:
    n: int = 10_000  # database size
    d: int = 128
    points_per_class: int = 100
    distractor_fraction: float = 0.3  # of n: points on distractor curves and scattered near curves
    n_queries: int = 1000
    harmonics: int = 4  # curve complexity
    amplitude: float = 1.0  # curve extent relative to class-centre spread
    centre_spread: float = 0.6  # small -> classes overlap more
    noise: float = 0.08
    shared_dim: int = 16  # all curves live in one shared subspace of this dimension: they cross
    seed: int = 0


def _curve_params(rng: np.random.Generator, d: int, harmonics: int, basis: np.ndarray):
    k = basis.shape[0]
    U = (rng.normal(size=(harmonics, 2, k)) / np.sqrt(k)) @ basis
    freqs = rng.uniform(0.3, 1.0, size=harmonics) * np.arange(1, harmonics + 1)
    phase = rng.uniform(0, 2 * np.pi, size=harmonics)
    return U, freqs, phase


def _curve_points(t: np.ndarray, centre: np.ndarray, U: np.ndarray, freqs: np.ndarray, phase: np.ndarray, amp: float) -> np.ndarray:
    ang = 2 * np.pi * freqs[None, :] * t[:, None] + phase[None, :]  # (m, H)
    return centre[None, :] + amp * (np.cos(ang) @ U[:, 0, :] + np.sin(ang) @ U[:, 1, :])


def make_manifold_dataset(spec: ManifoldSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns X (n, d) float32, labels (n,) int64 (-1 = distractor), Q (nq, d) float32, qlabels (nq,)."""
    rng = np.random.default_rng(spec.seed)
    n_dis = int(spec.n * spec.distractor_fraction)
    n_cls = max(1, (spec.n - n_dis) // spec.points_per_class)
    n_dcurves = max(1, n_dis // (2 * spec.points_per_class))
    X = np.empty((spec.n, spec.d), np.float32)
    labels = np.full(spec.n, -1, np.int64)
    basis = np.linalg.qr(rng.normal(size=(spec.d, spec.shared_dim)))[0].T  # (shared_dim, d) orthonormal
    curves = []
    pos = 0
    for c in range(n_cls + n_dcurves):
        centre = rng.normal(size=spec.d) * spec.centre_spread / np.sqrt(spec.d)
        U, f, ph = _curve_params(rng, spec.d, spec.harmonics, basis)
        curves.append((centre, U, f, ph))
        m = spec.points_per_class if c < n_cls else min(spec.points_per_class, spec.n - pos - max(0, n_dis - n_dcurves * spec.points_per_class))
        m = max(0, min(m, spec.n - pos))
        t = rng.uniform(0, 1, size=m)
        X[pos : pos + m] = _curve_points(t, centre, U, f, ph, spec.amplitude) + rng.normal(size=(m, spec.d)) * spec.noise / np.sqrt(spec.d)
        labels[pos : pos + m] = c if c < n_cls else -1
        pos += m
    # background clutter: points near random curves with large noise
    m = spec.n - pos
    if m > 0:
        which = rng.integers(0, len(curves), size=m)
        t = rng.uniform(0, 1, size=m)
        # each curve's points in one stable sort (a scan of `which` per curve was quadratic: 10^11 at 10^7)
        order = np.argsort(which, kind="stable")
        cuts = np.flatnonzero(np.diff(which[order])) + 1
        for sel in np.split(order, cuts):
            c = which[sel[0]]
            X[pos + sel] = _curve_points(t[sel], *curves[c], spec.amplitude) + rng.normal(size=(sel.size, spec.d)) * 4 * spec.noise / np.sqrt(spec.d)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    qlabels = rng.integers(0, n_cls, size=spec.n_queries)
    Q = np.empty((spec.n_queries, spec.d), np.float32)
    tq = rng.uniform(0, 1, size=spec.n_queries)
    for c in np.unique(qlabels):
        sel = np.flatnonzero(qlabels == c)
        Q[sel] = _curve_points(tq[sel], *curves[c], spec.amplitude) + rng.normal(size=(sel.size, spec.d)) * spec.noise / np.sqrt(spec.d)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    perm = rng.permutation(spec.n)  # classes interleaved in id order, as in a real collection
    return X[perm], labels[perm], Q, qlabels


def positives(labels: np.ndarray, qlabels: np.ndarray) -> list[np.ndarray]:
    """Per query, the database indices of its class."""
    order = np.argsort(labels, kind="stable")
    sl = labels[order]
    return [order[np.searchsorted(sl, c, "left") : np.searchsorted(sl, c, "right")] for c in qlabels]
