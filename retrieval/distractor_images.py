"""Distractor images of the scaling experiments: many distinct images that show no landmark,
drawn with PIL on 8-bit images from a few source photos (pure image making, no I/O).

`DistractorMaker(sources, generator)(rng, size)` -> (h, w, 3) uint8; each generator version draws
its own images, the same for the same seed (an experiment never mixes them).
"""
from __future__ import annotations

import numpy as np


GENERATORS = (2, 3, 4)  # the versions of DistractorMaker's images


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

    Generator 4 (`generator=4`) never lets one layer fill the frame: the image is split into 2-4
    regions (the Voronoi cells of random points), each filled by its own layer (`REGION_P`), and its
    fractal noise goes through a random transfer (as is, ridged, or banded into contours). In
    generator 3's experiments most near-duplicate pairs were one kind filling the frame: crops of the
    checkerboard source (5% of the images, 38% of the paired ones) and fractal noise (19%, 29%).
    """

    PAD = 640  # mirror padding of each source, pixels a side: more than half a rotated crop's diagonal
    # generator 3's layer kinds and their odds as the whole image (base) and as a patch
    KINDS = ("crop", "fractal", "shapes", "text", "field", "grating")
    BASE_P = (0.5, 0.2, 0.18, 0.12, 0.0, 0.0)
    PATCH_P = (0.35, 0.15, 0.2, 0.15, 0.1, 0.05)
    REGION_P = (0.45, 0.1, 0.25, 0.1, 0.05, 0.05)  # generator 4's odds for a region of the frame

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
        if self.generator == 2:
            return self._layer(rng, w, h)
        if base and self.generator == 4:
            return self._regions(rng, w, h)
        return self._layer3(rng, w, h, self.BASE_P if base else self.PATCH_P)

    def _layer3(self, rng: np.random.Generator, w: int, h: int, p: tuple[float, ...]):
        """Generator 3's (and 4's) layer of size (w, h): a kind of `KINDS` drawn with odds `p`."""
        kind = self.KINDS[rng.choice(len(self.KINDS), p=p)]
        if kind == "crop":
            return self._crop(rng, w, h)
        if kind == "fractal" and self.generator == 4:
            return self._transfer(rng, self._fractal(rng, w, h))
        if kind in ("field", "grating", "fractal"):
            return {"field": self._field, "grating": self._grating, "fractal": self._fractal}[kind](rng, w, h)
        from PIL import Image, ImageDraw

        img = self._crop(rng, w, h) if rng.uniform() < 0.5 else Image.new("RGB", (w, h), _colour(rng))
        (self._shapes if kind == "shapes" else self._text)(rng, ImageDraw.Draw(img), w, h)
        return img

    def _regions(self, rng: np.random.Generator, w: int, h: int):
        """Generator 4's base: the (w, h) frame cut into the Voronoi cells of 2-4 random points, each
        filled by a layer drawn with `REGION_P`."""
        from PIL import Image

        pts = rng.uniform([0, 0], [w, h], size=(int(rng.integers(2, 5)), 2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        cell = np.argmin([(xx - x) ** 2 + (yy - y) ** 2 for x, y in pts], axis=0)
        img = self._layer3(rng, w, h, self.REGION_P)
        for r in range(1, len(pts)):
            img.paste(self._layer3(rng, w, h, self.REGION_P), (0, 0), Image.fromarray(((cell == r) * 255).astype(np.uint8)))
        return img

    @staticmethod
    def _transfer(rng: np.random.Generator, img):
        """A random transfer of each channel's values v in [0, 1]: as is, ridged |2v - 1|, or banded 1/2 + sin(f v)/2."""
        from PIL import Image

        kind, f = int(rng.integers(3)), rng.uniform(6.0, 24.0)
        if kind == 0:
            return img
        v = np.asarray(img, np.float32) / 255
        v = np.abs(2 * v - 1) if kind == 1 else 0.5 + 0.5 * np.sin(f * v)
        return Image.fromarray((v * 255 + 0.5).astype(np.uint8))

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
