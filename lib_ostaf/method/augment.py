"""Augmentation that varies the *other* attribute (our choice; docs/method.md).

One image cannot say which of its properties is the attribute. The views can: whatever
varies across them is *not* the attribute, whatever stays is.

* shape: the reference's silhouette, re-coloured and re-textured (random colour, one of
  a few generic two-tone patterns — solid, stripes at any angle, dots, checker, noise) on
  a random pale background. The outline, in place, is the only constant.
* appearance: the reference's colours and texture (the object's pixels, tiled) cut to
  random silhouettes (ellipses, polygons, rounded boxes) on the reference's background.
  The texture is the only constant.
* style: mirrors and crops (style is global; nothing is cut out).

The object is found by the reference's mask, or automatically (``masks.auto_masks``).
Texture offsets are whole multiples of ``cell`` (the VAE's pixels per latent) so a pattern is
not blurred by the encoder. View 0 is the reference itself only for style. Views are
made once and encoded once (cached).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image, ImageDraw

from lib_ostaf.errors import InputError

ATTRIBUTES = ("shape", "appearance", "style")
log = logging.getLogger(__name__)


def make_views(
    image: Image.Image,
    attribute: str,
    n_views: int,
    seed: int,
    *,
    mask: np.ndarray | None = None,
    cell: int = 1,
) -> list[Image.Image]:
    """``n_views`` training views of a square RGB reference.

    ``mask``: the object's boolean mask at the image's size (None → automatic).
    """
    if attribute not in ATTRIBUTES:
        raise InputError(f"unknown attribute {attribute!r}; choose one of {', '.join(ATTRIBUTES)}")
    if n_views < 1:
        raise InputError(f"n_views must be at least 1, got {n_views}")
    rng = np.random.default_rng(seed)
    if attribute == "style":
        return [image] + [_geometric(image, rng, 0.7) for _ in range(n_views - 1)]
    rgb = np.asarray(image.convert("RGB"))
    obj = object_mask(image) if mask is None else np.asarray(mask, bool)
    if obj.shape != rgb.shape[:2]:
        raise InputError(
            f"mask is {obj.shape[1]}×{obj.shape[0]}, image {image.width}×{image.height}"
        )
    make = _restyled if attribute == "shape" else _reshaped
    return [Image.fromarray(make(rgb, obj, rng, max(1, cell))) for _ in range(n_views)]


def object_mask(image: Image.Image) -> np.ndarray:
    """The reference's main object (automatic); the whole image if none stands out."""
    from lib_ostaf.method.masks import auto_masks

    try:
        return auto_masks(image, 1)[0]
    except InputError:
        log.warning("no object found in the reference; the whole image counts as the object")
        return np.ones((image.height, image.width), bool)


# --------------------------------------------------------------------------- shape views


def _restyled(rgb: np.ndarray, obj: np.ndarray, rng: np.random.Generator, cell: int) -> np.ndarray:
    """The silhouette, in place, with a new colour and pattern on a new pale background.

    Not shifted: shifting it by whole latent cells measured far worse (docs/results.md)."""
    if obj.all():  # no silhouette to keep (no object found): rotate the image's hues
        hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(256))) % 256
        return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    h, w = obj.shape
    colour = _random_colour(rng)
    k = _pattern(h, w, rng, cell)[..., None]
    fill = colour * (1 - k) + colour * 0.35 * k
    background = rng.uniform(200, 255, size=3)
    out = np.where(obj[..., None], fill, background)
    return out.round().clip(0, 255).astype(np.uint8)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 256), rng.integers(140, 256), rng.integers(150, 256)]]])
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), float)[0, 0]


def _pattern(h: int, w: int, rng: np.random.Generator, cell: int) -> np.ndarray:
    """A generic two-tone pattern in [0, 1]: solid, stripes (any angle), dots, checker, noise."""
    yy, xx = np.mgrid[0:h, 0:w] // cell
    kind = int(rng.integers(5))
    period = int(rng.integers(2, 5))
    if kind == 0:
        return np.zeros((h, w))
    if kind == 1:
        a = rng.uniform(0, math.pi)
        return ((np.floor((xx * math.cos(a) + yy * math.sin(a)) / period)) % 2).astype(float)
    if kind == 2:
        return ((yy % period == 0) & (xx % period == 0)).astype(float)
    if kind == 3:
        return ((yy // period + xx // period) % 2).astype(float)
    noise = rng.uniform(0, 0.9, size=(h // cell + 1, w // cell + 1))
    return noise[yy, xx]


# ----------------------------------------------------------------------- appearance views


def _reshaped(rgb: np.ndarray, obj: np.ndarray, rng: np.random.Generator, cell: int) -> np.ndarray:
    """The object's texture, moved by a random offset, cut to a random silhouette inside it."""
    h, w = obj.shape
    texture = _texture_tile(rgb, _eroded(obj, cell))
    if min(texture.shape[:2]) < min(h, w) // 2:  # a small object: tile its texture
        texture = np.take(
            np.take(texture, np.arange(h), 0, mode="wrap"), np.arange(w), 1, mode="wrap"
        )
    th, tw = min(texture.shape[0], h), min(texture.shape[1], w)
    oy, ox = (int(rng.integers(0, (s - t) // cell + 1)) * cell for s, t in ((h, th), (w, tw)))
    background = np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0)
    field = np.broadcast_to(background, (h, w, 3)).copy()
    field[oy : oy + th, ox : ox + tw] = texture[:th, :tw]
    cut = np.zeros((h, w))
    cut[oy : oy + th, ox : ox + tw] = _silhouette(th, tw, rng)
    out = field * cut[..., None] + background * (1 - cut[..., None])
    return out.round().clip(0, 255).astype(np.uint8)


def _eroded(obj: np.ndarray, cell: int) -> np.ndarray:
    """The object without its rim (edge pixels mix object and background); kept if empty."""
    import cv2

    k = max(cell, round(0.02 * min(obj.shape))) * 2 + 1
    inner = cv2.erode(obj.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    return inner if inner.sum() >= 0.1 * obj.sum() else obj


def _texture_tile(rgb: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """The object's bounding box, its non-object pixels filled with the nearest object pixel."""
    import cv2

    ys, xs = np.nonzero(obj)
    if len(ys) == 0:
        return rgb.astype(float)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    crop, inside = rgb[box].astype(float), obj[box]
    if not inside.all():
        _, labels = cv2.distanceTransformWithLabels(
            (~inside).astype(np.uint8), cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL
        )
        iy, ix = np.nonzero(inside)
        source = np.zeros(labels.max() + 1, int)
        source[labels[iy, ix]] = np.arange(len(iy))
        nearest = source[labels]
        crop = crop[iy[nearest], ix[nearest]]
    return crop


def _silhouette(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random soft silhouette in [0, 1] filling 70–100 % of an ``h``×``w`` box: ellipse,
    polygon or rounded box."""
    ss = 4
    img = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(img)
    side = min(h, w) * ss
    r = side * rng.uniform(0.7, 1.0) / 2
    cx = rng.uniform(r, w * ss - r)
    cy = rng.uniform(r, h * ss - r)
    kind = int(rng.integers(3))
    if kind == 0:
        a = r * rng.uniform(0.55, 1.0)
        rx, ry = (r, a) if rng.random() < 0.5 else (a, r)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == 1:
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = r * rng.uniform(0.6, 1.0, n)
        draw.polygon(
            [
                (cx + q * math.cos(a), cy + q * math.sin(a))
                for a, q in zip(angles, radii, strict=True)
            ],
            fill=255,
        )
    else:
        a = r * rng.uniform(0.55, 1.0)
        draw.rounded_rectangle([cx - r, cy - a, cx + r, cy + a], radius=r * 0.3, fill=255)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), float) / 255.0


# ---------------------------------------------------------------------------- style views


def _geometric(image: Image.Image, rng: np.random.Generator, min_scale: float) -> Image.Image:
    size = image.width
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = max(8, round(size * float(np.sqrt(rng.uniform(min_scale, 1.0)))))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    return image.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)
