"""Loading the reference image (any common format in, a square RGB image out) and laying
images out in a labelled grid."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from lib_ostaf.errors import InputError

MIN_SIDE = 16
MAX_PIXELS = 64_000_000  # refuse decompression bombs before decoding


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """Open and normalise to 8-bit RGB: palette, RGBA (on white), 16-bit and grey converted."""
    image = open_image(source, "reference image")
    if min(image.size) < MIN_SIDE:
        raise InputError(f"image is {image.width}×{image.height}; at least {MIN_SIDE} px a side")
    if image.width * image.height > MAX_PIXELS:
        raise InputError(f"image is {image.width}×{image.height}; too large")
    return to_rgb(image)


def open_image(source: str | Path | Image.Image, label: str) -> Image.Image:
    """A PIL image as it is (mode kept), upright per its EXIF; a path is decoded, refusing
    decompression bombs. ``label`` names it in errors ("reference image", "mask of <a>")."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{label} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > MAX_PIXELS:
                raise InputError(
                    f"{label} {path.name}: {image.width}×{image.height} is too large "
                    f"(limit {MAX_PIXELS // 1_000_000} megapixels)"
                )
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot read {label} {path.name} as an image: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{label} {path.name} is too large to decode safely") from None
    return ImageOps.exif_transpose(image) or image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = Image.fromarray(((a - lo) * scale).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def square(image: Image.Image, size: int) -> Image.Image:
    """Pad to a square with the border's median colour (keeps the whole object), resize."""
    w, h = image.size
    if w != h:
        a = np.asarray(image)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        fill = tuple(int(v) for v in np.median(border, axis=0))
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    return image.resize((size, size), Image.Resampling.LANCZOS)


def grid(images: Sequence[Image.Image], cols: int, labels: Sequence[str] = ()) -> Image.Image:
    """Images in a grid, an optional label strip above each column."""
    w, h = images[0].size
    strip = 14 if labels else 0
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * w, rows * h + strip), "white")
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels[:cols]):
        draw.text((i * w + 3, 1), label, fill="black")
    for i, image in enumerate(images):
        canvas.paste(image.resize((w, h)), ((i % cols) * w, strip + (i // cols) * h))
    return canvas
