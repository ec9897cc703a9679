"""Synthetic views for an instance-retrieval benchmark made from real photos (pure array math).

A "landmark" is a photo; a view of it is the photo placed on a cluttered background under a
projective warp (scale, rotation, perspective, crop by the frame), with lighting change, occlusion
and noise. `difficulty` in [0, 1] scales every nuisance, so views of one landmark form a chain
from near-duplicates to hard views: the manifold that diffusion is meant to follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import transform as sktf


@dataclass(frozen=True)
class ViewInfo:
    """What a generated view shows of its landmark."""

    difficulty: float
    visible: float  # fraction of the landmark's area visible in the frame and not occluded
    coverage: float  # fraction of the frame covered by the visible landmark
    bbox: tuple[float, float, float, float]  # (x0, y0, x1, y1) of the landmark in the frame, clipped


def to_rgb_float(img: np.ndarray) -> np.ndarray:
    """Any skimage-style image (gray, RGB, RGBA, bool, uint8) -> (H, W, 3) float64 in [0, 1]."""
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.float64)
    elif np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64) / 255.0
    else:
        a = a.astype(np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-9)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.clip(a[..., :3], 0.0, 1.0)


def _estimate_projective(src: np.ndarray, dst: np.ndarray) -> sktf.ProjectiveTransform:
    """Homography src -> dst (the one wrapper over scikit-image's estimate API, which changed in 0.26)."""
    if hasattr(sktf.ProjectiveTransform, "from_estimate"):
        H = sktf.ProjectiveTransform.from_estimate(src, dst)
        ok = bool(H)
    else:
        H = sktf.ProjectiveTransform()
        ok = H.estimate(src, dst)
    if not ok:
        raise RuntimeError("degenerate view homography")
    return H


def _quad_area(q: np.ndarray) -> float:
    x, y = q[:, 0], q[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def background(sources: list[np.ndarray], shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Clutter: a random warped crop of a random source, colour-shifted, plus random blobs."""
    h, w = shape
    src = sources[rng.integers(len(sources))]
    sh, sw = src.shape[:2]
    scale = rng.uniform(0.5, 2.0)
    angle = rng.uniform(-np.pi, np.pi)
    t = sktf.AffineTransform(scale=1 / scale, rotation=angle)
    t = sktf.AffineTransform(translation=(rng.uniform(0, sw), rng.uniform(0, sh))) + t
    t = sktf.AffineTransform(translation=(-w / 2, -h / 2)) + t
    bg = sktf.warp(src, t, output_shape=(h, w), mode="reflect", order=1)
    bg = bg * rng.uniform(0.5, 1.2, size=3) + rng.uniform(-0.1, 0.1, size=3)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(0, 5)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        m = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        bg[m] = rng.uniform(0, 1, size=3)
    return np.clip(bg, 0, 1)


def make_view(
    landmark: np.ndarray,
    clutter: list[np.ndarray],
    *,
    difficulty: float,
    rng: np.random.Generator,
    size: int = 288,
) -> tuple[np.ndarray, ViewInfo]:
    """One view of `landmark` ((H, W, 3) float in [0, 1]) at the given difficulty.

    Returns: (size_h, size_w, 3) uint8 image and its ViewInfo.
    """
    d = float(np.clip(difficulty, 0.0, 1.0))
    lh, lw = landmark.shape[:2]
    aspect = rng.choice([0.75, 1.0, 1.33])
    h, w = (size, int(round(size * aspect))) if aspect >= 1 else (int(round(size / aspect)), size)
    h, w = min(h, int(size * 1.34)), min(w, int(size * 1.34))
    # Landmark footprint: fits the frame at scale 1; smaller (clutter) or larger (cropped) with d.
    fit = min(w / lw, h / lh)
    s = fit * np.exp(rng.normal(0.0, 0.15 + 0.45 * d)) * (1.0 - 0.35 * d * rng.uniform())
    angle = rng.normal(0.0, np.deg2rad(3 + 30 * d))
    cx = w / 2 + rng.normal(0.0, 0.05 + 0.2 * d) * w
    cy = h / 2 + rng.normal(0.0, 0.05 + 0.2 * d) * h
    src = np.array([[0, 0], [lw, 0], [lw, lh], [0, lh]], dtype=np.float64)
    rect = (src - [lw / 2, lh / 2]) * s
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = rect @ rot.T + [cx, cy]
    dst += rng.normal(0.0, 0.02 + 0.12 * d, size=(4, 2)) * [s * lw, s * lh]  # perspective
    H = _estimate_projective(src, dst)
    fg = sktf.warp(landmark, H.inverse, output_shape=(h, w), order=1, cval=0.0)
    mask = sktf.warp(np.ones((lh, lw)), H.inverse, output_shape=(h, w), order=0, cval=0.0) > 0.5
    img = background(clutter, (h, w), rng)
    img[mask] = fg[mask]
    # Lighting: gamma, gain, colour cast, then occluders, then sensor noise.
    img = np.clip(img, 0, 1) ** np.exp(rng.normal(0.0, 0.1 + 0.35 * d))
    img = img * rng.uniform(1 - 0.4 * d, 1 + 0.2 * d) * (1 + rng.normal(0, 0.03 + 0.1 * d, size=3))
    occluded = np.zeros((h, w), dtype=bool)
    for _ in range(rng.poisson(0.3 + 2.5 * d)):
        oh, ow = (rng.uniform(0.08, 0.2 + 0.35 * d) * np.array([h, w])).astype(int)
        y0, x0 = rng.integers(0, max(h - oh, 1)), rng.integers(0, max(w - ow, 1))
        occluded[y0 : y0 + oh, x0 : x0 + ow] = True
        img[y0 : y0 + oh, x0 : x0 + ow] = background(clutter, (oh, ow), rng) if oh > 4 and ow > 4 else 0.5
    img = img + rng.normal(0.0, 0.01 + 0.03 * d, size=img.shape)
    img8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

    area = _quad_area(dst)
    vis_mask = mask & ~occluded
    visible = float(vis_mask.sum() / max(area, 1.0))
    coverage = float(vis_mask.mean())
    ys, xs = np.nonzero(mask)
    bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)) if ys.size else (0.0, 0.0, float(w), float(h))
    return img8, ViewInfo(d, min(visible, 1.0), coverage, bbox)


def _collage(sources: list[np.ndarray], rng: np.random.Generator, size: int, patches: tuple[int, int],
             extent: tuple[float, float]) -> np.ndarray:
    """Clutter (`background`) with patches[0]..patches[1]-1 pasted patches of other clutter, each
    extent[0]..extent[1] of the frame a side. (h, w, 3) float in [0, 1]."""
    h, w = size, int(size * rng.choice([0.75, 1.0, 1.33]))
    img = background(sources, (h, w), rng)
    for _ in range(rng.integers(*patches)):
        ph, pw = (rng.uniform(*extent) * np.array([h, w])).astype(int)
        y0, x0 = rng.integers(0, h - ph), rng.integers(0, w - pw)
        img[y0 : y0 + ph, x0 : x0 + pw] = background(sources, (ph, pw), rng)
    return img


def make_distractor(sources: list[np.ndarray], rng: np.random.Generator, *, size: int = 288) -> np.ndarray:
    """A cluttered image of no landmark: warped crops of distractor sources. (h, w, 3) uint8."""
    img = _collage(sources, rng, size, (0, 3), (0.2, 0.6))
    img = img + rng.normal(0.0, 0.02, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def label_view(info: ViewInfo, *, hard_from: float = 0.5, junk_visible: float = 0.3, junk_coverage: float = 0.05) -> str:
    """Revisited-Oxford style label of a view: 'easy', 'hard' or 'junk'."""
    if info.visible < junk_visible or info.coverage < junk_coverage:
        return "junk"
    if info.difficulty >= hard_from or info.visible < 0.6:
        return "hard"
    return "easy"


def make_scene(sources: list[np.ndarray], rng: np.random.Generator, *, size: int = 288) -> np.ndarray:
    """A busy background scene, (h, w, 3) float in [0, 1]: clutter plus several pasted patches of other
    sources. Scenes are made once and shared by many images (recurring clutter)."""
    return _collage(sources, rng, size, (2, 5), (0.15, 0.45))


def place_object(scene: np.ndarray, obj: np.ndarray | None, *, coverage: float, difficulty: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, ViewInfo]:
    """`obj` ((H, W, 3) float) pasted into a copy of `scene` so that it covers about `coverage` of the
    frame, at a random place, under a mild projective warp growing with `difficulty`; then a random
    crop-shift of the scene, lighting change and noise. obj None gives the scene alone (a distractor).

    Returns: (h, w, 3) uint8 and ViewInfo (bbox of the object in the frame; coverage measured).
    """
    d = float(np.clip(difficulty, 0.0, 1.0))
    h, w = scene.shape[:2]
    # the scene itself moves a little between images: shift + scale, as a camera would
    t = sktf.AffineTransform(scale=rng.uniform(0.9, 1.1), translation=rng.uniform(-0.08, 0.08, 2) * [w, h])
    img = sktf.warp(scene, t, output_shape=(h, w), mode="reflect", order=1)
    bbox, cov = (0.0, 0.0, float(w), float(h)), 0.0
    if obj is not None:
        lh, lw = obj.shape[:2]
        s = np.sqrt(coverage * h * w / (lh * lw))
        angle = rng.normal(0.0, np.deg2rad(3 + 20 * d))
        half = np.array([lw, lh]) * s / 2
        margin = np.minimum(half * 1.1, [w / 2, h / 2])
        cx, cy = rng.uniform(margin[0], w - margin[0]), rng.uniform(margin[1], h - margin[1])
        src = np.array([[0, 0], [lw, 0], [lw, lh], [0, lh]], dtype=np.float64)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        dst = ((src - [lw / 2, lh / 2]) * s) @ rot.T + [cx, cy]
        dst += rng.normal(0.0, 0.02 + 0.08 * d, size=(4, 2)) * [s * lw, s * lh]
        H = _estimate_projective(src, dst)
        fg = sktf.warp(obj, H.inverse, output_shape=(h, w), order=1, cval=0.0)
        mask = sktf.warp(np.ones((lh, lw)), H.inverse, output_shape=(h, w), order=0, cval=0.0) > 0.5
        img[mask] = fg[mask]
        ys, xs = np.nonzero(mask)
        if ys.size:
            bbox = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        cov = float(mask.mean())
    img = np.clip(img, 0, 1) ** np.exp(rng.normal(0.0, 0.1 + 0.25 * d))
    img = img * rng.uniform(1 - 0.3 * d, 1 + 0.15 * d) * (1 + rng.normal(0, 0.03 + 0.06 * d, size=3))
    img = img + rng.normal(0.0, 0.01 + 0.02 * d, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), ViewInfo(d, 1.0 if obj is not None else 0.0, cov, bbox)


def label_clutter_view(info: ViewInfo, *, hard_below: float = 0.1, hard_from: float = 0.5) -> str:
    """Label of a small-object view: 'hard' when the object covers under `hard_below` of the frame or the
    view is difficult, else 'easy' (the object is never occluded: no junk)."""
    return "hard" if info.coverage < hard_below or info.difficulty >= hard_from else "easy"
