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


GENERATORS = (2, 3)  # the versions of DistractorMaker's images


class DistractorMaker:
    """Distractors of the scaling experiments (generator 2): more diverse than `make_distractor`
    (which the benchmark's own distractors keep) and about 5x cheaper, drawn with PIL on 8-bit images.

    Each image composes 2-5 layers in rectangular or elliptical patches with random opacity: warped
    crops of the sources (random scale, rotation and place; the sources are mirror-padded once so a
    crop never leaves them), smooth random colour fields, colour gratings; then a few solid blobs, its
    own colour transform (a random 3x3 mix, so hues move, not only channel gains), orientation (a
    quarter turn, a mirror) and noise. `maker(rng, size)` -> (h, w, 3) uint8.

    Generator 3 (`generator=3`) keeps the composition and draws its layers from more kinds, with
    structure a CNN tells apart: besides the crops, fractal noise (octaves of random colour grids),
    sharp-edged polygons and strokes, and lines of random text; smooth colour fields and gratings only
    as patches, never the whole image, and blobs in a third of the images. In generator 2's
    experiments the near-duplicate sets were smooth colour fields and blobs on them (BENCHMARKS.md).
    """

    PAD = 640  # mirror padding of each source, pixels a side: more than half a rotated crop's diagonal
    # generator 3's layer kinds and their odds as the whole image (base) and as a patch
    KINDS = ("crop", "fractal", "shapes", "text", "field", "grating")
    BASE_P = (0.5, 0.2, 0.18, 0.12, 0.0, 0.0)
    PATCH_P = (0.35, 0.15, 0.2, 0.15, 0.1, 0.05)

    def __init__(self, sources: list[np.ndarray], generator: int = 2):
        from PIL import Image

        if generator not in GENERATORS:
            raise ValueError(f"DistractorMaker: generator must be one of {GENERATORS}; got {generator!r}")
        self.generator = generator
        self._fonts: dict = {}
        self.sources = [(Image.fromarray(np.pad((np.clip(s, 0, 1) * 255 + 0.5).astype(np.uint8),
                                                ((self.PAD, self.PAD), (self.PAD, self.PAD), (0, 0)), mode="symmetric")),
                         s.shape[1], s.shape[0]) for s in sources]

    def _layer(self, rng: np.random.Generator, w: int, h: int):
        """Generator 2's layer of size (w, h) (a PIL image): a crop of a source, a smooth field or a grating."""
        kind = rng.uniform()
        if kind < 0.5:
            return self._crop(rng, w, h)
        if kind < 0.8:
            return self._field(rng, w, h)
        return self._grating(rng, w, h)

    def _crop(self, rng: np.random.Generator, w: int, h: int):
        """A crop of a source under a random scale and rotation: out(x, y) = src(centre + scale R (x - w/2, y - h/2))."""
        from PIL import Image

        tile, sw, sh = self.sources[rng.integers(len(self.sources))]
        scale, angle = np.exp(rng.uniform(np.log(0.5), np.log(2.0))), rng.uniform(-np.pi, np.pi)
        c, s_ = scale * np.cos(angle), scale * np.sin(angle)
        cx, cy = self.PAD + rng.uniform(0, sw), self.PAD + rng.uniform(0, sh)
        data = (c, -s_, cx - c * w / 2 + s_ * h / 2, s_, c, cy - s_ * w / 2 - c * h / 2)
        return tile.transform((w, h), Image.AFFINE, data, resample=Image.BILINEAR)

    @staticmethod
    def _field(rng: np.random.Generator, w: int, h: int):
        """A smooth field: a coarse random grid of colours, interpolated up."""
        from PIL import Image

        g = rng.integers(2, 12, size=2)
        return Image.fromarray(rng.integers(0, 256, size=(g[0], g[1], 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)

    @staticmethod
    def _grating(rng: np.random.Generator, w: int, h: int):
        """A sinusoidal grating between two colours."""
        from PIL import Image

        theta, period, phase = rng.uniform(0, np.pi), rng.uniform(4, max(h, w)), rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (0.5 + 0.5 * np.sin((2 * np.pi / period) * (xx * np.cos(theta) + yy * np.sin(theta)) + phase))[..., None]
        c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        return Image.fromarray((t * c0 + (1 - t) * c1).astype(np.uint8))

    def _any_layer(self, rng: np.random.Generator, w: int, h: int, base: bool = False):
        return self._layer(rng, w, h) if self.generator == 2 else self._layer3(rng, w, h, base)

    def _layer3(self, rng: np.random.Generator, w: int, h: int, base: bool):
        """Generator 3's layer of size (w, h): a kind drawn with `BASE_P` or `PATCH_P`."""
        kind = self.KINDS[rng.choice(len(self.KINDS), p=self.BASE_P if base else self.PATCH_P)]
        if kind == "crop":
            return self._crop(rng, w, h)
        if kind in ("field", "grating", "fractal"):
            return {"field": self._field, "grating": self._grating, "fractal": self._fractal}[kind](rng, w, h)
        from PIL import Image, ImageDraw

        img = self._crop(rng, w, h) if rng.uniform() < 0.5 else Image.new("RGB", (w, h), _colour(rng))
        (self._shapes if kind == "shapes" else self._text)(rng, ImageDraw.Draw(img), w, h)
        return img

    @staticmethod
    def _fractal(rng: np.random.Generator, w: int, h: int):
        """Fractal noise: octaves of random colour grids, each twice as fine and a random fraction as strong."""
        from PIL import Image

        acc, amp, g, total = np.zeros((h, w, 3), np.float32), 1.0, int(rng.integers(2, 5)), 0.0
        decay = rng.uniform(0.4, 0.8)
        while g <= max(w, h) // 2:
            grid = rng.integers(0, 256, size=(g, max(2, g * w // h), 3), dtype=np.uint8)
            acc += amp * np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32)
            total, amp, g = total + amp, amp * decay, g * 2
        return Image.fromarray(np.clip(acc / total, 0, 255).astype(np.uint8))

    @staticmethod
    def _shapes(rng: np.random.Generator, draw, w: int, h: int) -> None:
        """Sharp-edged polygons, filled or outlined, and strokes, drawn with `draw` on a (w, h) image."""
        for _ in range(int(rng.integers(3, 16))):
            c = rng.uniform([0, 0], [w, h])
            r = rng.uniform(0.05, 0.4) * min(w, h)
            nv = int(rng.integers(3, 8))
            ang = np.sort(rng.uniform(0, 2 * np.pi, nv))
            pts = [tuple(p) for p in (c + r * rng.uniform(0.4, 1.0, (nv, 1)) * np.stack([np.cos(ang), np.sin(ang)], 1)).tolist()]
            style = rng.uniform()
            if style < 0.5:
                draw.polygon(pts, fill=_colour(rng))
            elif style < 0.75:
                draw.polygon(pts, outline=_colour(rng), width=int(rng.integers(1, 6)))
            else:
                draw.line(pts, fill=_colour(rng), width=int(rng.integers(1, 8)))

    def _text(self, rng: np.random.Generator, draw, w: int, h: int) -> None:
        """Lines of random text at random sizes, drawn with `draw` on a (w, h) image."""
        for _ in range(int(rng.integers(1, 7))):
            size = int(rng.choice(TEXT_SIZES))
            font = self._fonts.get(size) or self._fonts.setdefault(size, _font(size))
            text = "".join(rng.choice(list(TEXT_ALPHABET), int(rng.integers(3, 20))))
            draw.text(tuple(rng.uniform([-0.2 * w, 0], [w, h])), text, fill=_colour(rng), font=font)

    def __call__(self, rng: np.random.Generator, size: int = 288) -> np.ndarray:
        from PIL import Image, ImageDraw

        h, w = size, int(size * rng.choice([0.75, 1.0, 1.33]))
        img = self._any_layer(rng, w, h, base=True)
        for _ in range(rng.integers(1, 5)):
            pw, ph = (rng.uniform(0.2, 0.7, size=2) * [w, h]).astype(int) + 2
            ellipse, opacity = rng.uniform() < 0.5, int(rng.uniform(0.5, 1.0) * 255)
            mask = Image.new("L", (pw, ph), 0)
            draw = ImageDraw.Draw(mask)
            (draw.ellipse if ellipse else draw.rectangle)((0, 0, pw - 1, ph - 1), fill=opacity)
            img.paste(self._any_layer(rng, pw, ph), (int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))), mask)
        draw = ImageDraw.Draw(img)
        blobs = rng.integers(0, 4) if self.generator == 2 else (rng.integers(1, 4) if rng.uniform() < 1 / 3 else 0)
        for _ in range(blobs):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.2) * min(h, w)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_colour(rng))
        mix = (np.eye(3) * rng.uniform(0.2, 1.0) + rng.normal(0.0, 0.4, size=(3, 3))).astype(np.float32)
        px = np.asarray(img, dtype=np.float32).reshape(-1, 3).T  # (3, h * w): each channel contiguous
        a = mix[:, :1] * px[0] + mix[:, 1:2] * px[1] + mix[:, 2:] * px[2]  # mix @ px without BLAS threads
        lo, hi = a.min(axis=1, keepdims=True), a.max(axis=1, keepdims=True)
        a = (a - lo) * (rng.uniform(0.5, 1.0) * 255 / np.maximum(hi - lo, 1e-3)) + (rng.uniform(0.0, 0.3) * 255 + 0.5)
        a += rng.standard_normal(a.shape, dtype=np.float32) * 5.0
        a = np.clip(a, 0, 255).astype(np.uint8).T.reshape(h, w, 3)
        a = np.rot90(a, rng.integers(4))
        a = a[:, ::-1] if rng.uniform() < 0.5 else a
        return np.ascontiguousarray(a)


TEXT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .-"
TEXT_SIZES = (10, 14, 18, 24, 32, 44, 60)  # pixels


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _font(size: int):
    """PIL's bundled font at `size` pixels (FreeType), or its bitmap font where FreeType is missing."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


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
