"""The procedural attribute world: objects whose shape, appearance and style vary
independently, with captions and ground-truth masks. Deterministic from a seed.

Every image is drawn on a 16×16 grid (shapes supersampled 8× for soft edges) and shown
at 128 px by nearest upscaling — exactly what the embedded tiny model's analytic VAE
(8× average pool / 8× nearest upsample, see ``bench/train_tiny.py``) can represent, so
no model capacity or CPU time is spent on an autoencoder. Reasons in docs/results.md.

Attributes:
* shape: circle, square, triangle, star, heart, cross, diamond, ring (+ ``moon``, never
  in training: the benchmark's *new shape*);
* appearance = colour × texture: 8 colours × solid, striped, dotted, checker, gradient,
  noisy (+ ``diagonal``, never in training: the benchmark's *new texture*);
* style: flat, outlined, blurred;
* background: a random pale tint (not captioned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GRID = 16  # the world's native resolution (= the tiny model's latent grid)
SCALE = 8  # display upscaling: GRID * SCALE = 128 px
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
    "cyan": (20, 200, 210),
    "pink": (245, 110, 180),
}
TEXTURES = ("solid", "striped", "dotted", "checker", "gradient", "noisy")
STYLES = ("flat", "outlined", "blurred")
NEW_SHAPE = "moon"
NEW_TEXTURE = "diagonal"
# Held-out (shape, texture) pairs: never rendered for training; measure generalisation.
HELD_OUT = (
    ("star", "checker"),
    ("heart", "striped"),
    ("circle", "dotted"),
    ("triangle", "gradient"),
    ("square", "noisy"),
    ("ring", "solid"),
)


@dataclass(frozen=True)
class Spec:
    """One object: attributes plus layout (centre and radius in grid units)."""

    shape: str
    colour: str
    texture: str
    style: str = "flat"
    cx: float = 8.0
    cy: float = 8.0
    radius: float = 6.0
    background: tuple[int, int, int] = (245, 245, 245)
    seed: int = 0


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a) + 0.15 * r) for a in _angles(3)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "cross":
        w = 0.38 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17, cy - r * y / 17 + 0.1 * r))
        return pts
    return None


def _angles(n: int) -> list[float]:
    return [-math.pi / 2 + 2 * math.pi * i / n for i in range(n)]


def shape_mask(shape: str, cx: float, cy: float, r: float, grid: int = GRID) -> np.ndarray:
    """Soft coverage in [0, 1] of ``shape`` on a ``grid``² raster (8× supersampled)."""
    ss = 8
    size = grid * ss
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    s = lambda v: v * ss  # noqa: E731
    box = [s(cx - r), s(cy - r), s(cx + r), s(cy + r)]
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "square":
        q = 0.82 * r
        d.rectangle([s(cx - q), s(cy - q), s(cx + q), s(cy + q)], fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        q = 0.5 * r
        d.ellipse([s(cx - q), s(cy - q), s(cx + q), s(cy + q)], fill=0)
    elif shape == NEW_SHAPE:  # crescent
        d.ellipse(box, fill=255)
        o = 0.55 * r
        d.ellipse([s(cx - r + o), s(cy - r - 0.2 * r), s(cx + r + o), s(cy + r - 0.2 * r)], fill=0)
    else:
        poly = _polygon(shape, cx, cy, r)
        if poly is None:
            raise ValueError(f"unknown shape {shape!r}")
        d.polygon([(s(x), s(y)) for x, y in poly], fill=255)
    a = np.asarray(img, dtype=np.float32).reshape(grid, ss, grid, ss).mean(axis=(1, 3))
    return a / 255.0


def texture_rgb(spec: Spec, grid: int = GRID) -> np.ndarray:
    """The object's appearance over the whole grid (float RGB in [0, 1])."""
    base = np.array(COLOURS[spec.colour], dtype=np.float32) / 255.0
    dark = base * 0.35
    rng = np.random.default_rng(spec.seed + 7)
    yy, xx = np.mgrid[0:grid, 0:grid]
    ox, oy = (int(v) for v in rng.integers(0, 4, size=2))
    t = spec.texture
    if t == "solid":
        k = np.zeros((grid, grid), np.float32)
    elif t == "striped":
        k = (((yy + oy) // 2) % 2).astype(np.float32)
    elif t == "dotted":
        k = (((yy + oy) % 3 == 0) & ((xx + ox) % 3 == 0)).astype(np.float32)
    elif t == "checker":
        k = ((((yy + oy) // 2) + ((xx + ox) // 2)) % 2).astype(np.float32)
    elif t == "gradient":
        k = np.clip((xx - spec.cx + spec.radius) / (2 * spec.radius), 0, 1).astype(np.float32)
    elif t == "noisy":
        k = rng.uniform(0, 0.9, size=(grid, grid)).astype(np.float32)
    elif t == NEW_TEXTURE:
        k = (((xx + yy + ox) // 2) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {t!r}")
    return base[None, None] * (1 - k[..., None]) + dark[None, None] * k[..., None]


def render(spec: Spec) -> tuple[Image.Image, np.ndarray]:
    """(128 px RGB image, 16×16 binary mask) of one object."""
    cov = shape_mask(spec.shape, spec.cx, spec.cy, spec.radius)
    bg = np.broadcast_to(np.array(spec.background, np.float32) / 255.0, (GRID, GRID, 3))
    fg = texture_rgb(spec)
    img = bg * (1 - cov[..., None]) + fg * cov[..., None]
    if spec.style == "outlined":
        inside = cov > 0.5
        pad = np.pad(inside, 1)
        edge = inside & ~(
            pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        )  # boundary pixels of the object
        img[edge] = 0.08
    elif spec.style == "blurred":
        small = Image.fromarray((img * 255).round().astype(np.uint8))
        img = np.asarray(small.filter(ImageFilter.GaussianBlur(0.9)), np.float32) / 255.0
    elif spec.style != "flat":
        raise ValueError(f"unknown style {spec.style!r}")
    pixels = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return pixels.resize((GRID * SCALE,) * 2, Image.Resampling.NEAREST), cov > 0.5


def caption(spec: Spec, rng: np.random.Generator | None = None) -> str:
    """Full caption, or with ``rng`` a random variant (attributes dropped, templates)."""
    colour, texture, shape = spec.colour, spec.texture, spec.shape
    style = "" if spec.style == "flat" else f", {spec.style}"
    if rng is None:
        return f"a {colour} {texture} {shape}{style}"
    words = []
    if rng.random() > 0.2:
        words.append(colour)
    if rng.random() > 0.2:
        words.append(texture + (" textured" if rng.random() < 0.2 else ""))
    u = rng.random()
    noun = "object" if u < 0.15 else f"{shape} shaped object" if u < 0.3 else shape
    prefix = "a photo of " if rng.random() < 0.25 else ""
    if rng.random() < 0.3:
        style = ""
    return f"{prefix}a {' '.join([*words, noun])}{style}"


def random_spec(rng: np.random.Generator, *, train: bool = True) -> Spec:
    """A random object; with ``train`` never a held-out pair, new shape or new texture."""
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        if not train or (shape, texture) not in HELD_OUT:
            break
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    style = STYLES[rng.choice(3, p=[0.6, 0.2, 0.2])]
    r = float(rng.uniform(4.8, 6.8))
    cx, cy = (float(v) for v in rng.uniform(1 + r, GRID - 1 - r, size=2))
    bg = tuple(int(v) for v in rng.integers(205, 256, size=3))
    return Spec(shape, colour, texture, style, cx, cy, r, bg, int(rng.integers(1 << 30)))


def batch(
    n: int, seed: int, *, train: bool = True, captions: str = "random"
) -> tuple[np.ndarray, list[str], list[Spec]]:
    """``n`` images as a float array (n, 3, 16, 16) in [-1, 1], captions and specs."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng, train=train) for _ in range(n)]
    images = np.stack([grid_array(s) for s in specs])
    caps = [caption(s, rng if captions == "random" else None) for s in specs]
    return images, caps, specs


def grid_array(spec: Spec) -> np.ndarray:
    """The 16×16 image of ``spec`` as float (3, 16, 16) in [-1, 1]."""
    img, _ = render(spec)
    a = np.asarray(img.resize((GRID, GRID), Image.Resampling.BOX), np.float32) / 127.5 - 1.0
    return a.transpose(2, 0, 1)


def with_(spec: Spec, **changes: object) -> Spec:
    return replace(spec, **changes)  # type: ignore[arg-type]
