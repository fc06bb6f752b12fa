"""Augmentation that respects the attribute being learned (our choice; docs/method.md).

* shape: vary colour only (hue, saturation, brightness) — the silhouette never moves,
  and the varying colours tell the model that colour is *not* the attribute.
* appearance / style: vary geometry only (mirror, crops of 55–100 %) — colour, texture
  and stroke stay, the outline changes, so the outline is *not* the attribute.

View 0 is always the reference itself. Views are made once and encoded once (cached).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from .errors import InputError

ATTRIBUTES = ("shape", "appearance", "style")


def _colour_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(0, 256))) % 256
    out = Image.fromarray(hsv, mode="HSV").convert("RGB")
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.6, 1.4)))
    return ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.85, 1.15)))


def _geometric(image: Image.Image, rng: np.random.Generator, min_scale: float) -> Image.Image:
    size = image.width
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = max(8, round(size * float(np.sqrt(rng.uniform(min_scale, 1.0)))))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    return image.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)


def make_views(image: Image.Image, attribute: str, n_views: int, seed: int) -> list[Image.Image]:
    """``n_views`` training views of a square RGB reference (view 0 = the reference)."""
    if attribute not in ATTRIBUTES:
        raise InputError(f"unknown attribute {attribute!r}; choose one of {', '.join(ATTRIBUTES)}")
    if n_views < 1:
        raise InputError(f"n_views must be at least 1, got {n_views}")
    rng = np.random.default_rng(seed)
    views = [image]
    for _ in range(n_views - 1):
        if attribute == "shape":
            views.append(_colour_jitter(image, rng))
        else:
            views.append(_geometric(image, rng, 0.55 if attribute == "appearance" else 0.7))
    return views
