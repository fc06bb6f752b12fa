"""Object masks: loading, checking, the latent grid, and automatic masks.

One rule for every mask (ours; docs/method.md): a mask is made binary at 50 % (grey,
anti-aliased or soft masks all go through the same threshold), follows the image through
exactly the same geometry (pad to a square, resize, flip), and becomes per-latent-cell
*coverage* — the fraction of each 8×8-pixel cell inside the object — optionally feathered
outwards by a Gaussian of ``feather`` latent cells. Inside the object the weight stays 1.

Without a mask, :func:`auto_masks` segments the image with OpenCV's GrabCut, seeded by the
image border (background) and by the pixels whose colour differs most from the border
(a border-contrast saliency, Otsu threshold).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lib_ostaf.errors import InputError
from lib_ostaf.method.images import open_image

log = logging.getLogger(__name__)

THRESHOLD = 0.5
FULL_COVERAGE = 0.995  # a mask covering more than this is "everything"
GREY_TOLERANCE = 8  # levels from 0/255 that still count as binary
GREY_WARN_FRACTION = 0.02  # more grey pixels than this → "non-binary" warning

MaskSource = str | Path | Image.Image | np.ndarray


def load_mask(
    source: MaskSource,
    image_size: tuple[int, int],
    *,
    label: str = "mask",
    threshold: float = THRESHOLD,
) -> np.ndarray:
    """A boolean ``[H, W]`` mask for an image of ``image_size`` (W, H).

    Accepts a path, PIL image or array: white (or opaque, for images with transparency)
    is the object. A different size is resized with a warning; grey values are
    thresholded (with a warning when many); empty or all-covering masks are refused.
    """
    grey = _grey(source, label)
    w, h = image_size
    if grey.shape != (h, w):
        log.warning(
            "%s is %d×%d but the image is %d×%d; resized to the image",
            label,
            grey.shape[1],
            grey.shape[0],
            w,
            h,
        )
        grey = np.asarray(
            Image.fromarray(grey).resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8
        )
    levels = grey.astype(np.int16)
    grey_fraction = float(((levels > GREY_TOLERANCE) & (levels < 255 - GREY_TOLERANCE)).mean())
    if grey_fraction > GREY_WARN_FRACTION:
        log.warning(
            "%s is not binary (%.0f%% grey pixels); thresholded at %.0f%%",
            label,
            100 * grey_fraction,
            100 * threshold,
        )
    mask = grey >= threshold * 255
    check_mask(mask, label)
    return mask


def _grey(source: MaskSource, label: str) -> np.ndarray:
    """uint8 [H, W]: alpha if the image has transparency, else luminance."""
    if isinstance(source, np.ndarray):
        a = np.asarray(source)
        if a.ndim == 3:
            a = a.mean(axis=-1)
        if a.ndim != 2:
            raise InputError(f"{label}: a mask array must be 2-D, got shape {list(source.shape)}")
        if a.dtype == bool:
            return a.astype(np.uint8) * 255
        a = a.astype(np.float64)
        if a.size and a.max() <= 1.0:
            a = a * 255
        return np.clip(a.round(), 0, 255).astype(np.uint8)
    image = open_image(source, label)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        hi = float(a.max()) or 1.0
        return np.clip(a / hi * 255, 0, 255).round().astype(np.uint8)
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def check_mask(mask: np.ndarray, label: str = "mask") -> None:
    """InputError for an empty mask or one that covers (nearly) the whole image."""
    coverage = float(mask.mean()) if mask.size else 0.0
    if coverage == 0.0:
        raise InputError(f"{label} is empty: no pixel is white/opaque; paint the object in white")
    if coverage >= FULL_COVERAGE:
        raise InputError(
            f"{label} covers the whole image ({100 * coverage:.1f}%); it must leave some "
            "background (is it inverted? the object must be white)"
        )


# --------------------------------------------------------------------------- latent grid


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized to ``size`` (W, H) on PIL's pixel grid (as images resize).

    Area-averaged (BOX filter) and thresholded at 50 %; an object thinner than half a
    pixel after resizing keeps its best-covered pixels rather than vanishing.
    """
    if mask.shape == (size[1], size[0]):
        return mask.astype(bool)
    grey = Image.fromarray(mask.astype(np.float32))  # mode "F"
    coverage = np.asarray(grey.resize(size, Image.Resampling.BOX), dtype=np.float32)
    resized = coverage >= THRESHOLD
    if not resized.any() and coverage.max() > 0:
        resized = coverage >= 0.5 * coverage.max()
    return resized


def square_mask(mask: np.ndarray, size: int | None = None) -> np.ndarray:
    """The mask through :func:`lib_ostaf.method.images.square`'s geometry: padded to a square
    (centred, as the image is) and, with ``size``, resized to ``size``×``size``."""
    h, w = mask.shape
    out = mask
    if h != w:
        side = max(h, w)
        out = np.zeros((side, side), dtype=mask.dtype)
        x, y = (side - w) // 2, (side - h) // 2
        out[y : y + h, x : x + w] = mask
    return out if size is None else resize_mask(out, (size, size))


def latent_weights(
    mask: np.ndarray, latent_hw: tuple[int, int], feather: float = 0.0
) -> torch.Tensor:
    """``[1, 1, h, w]`` weights on the latent grid: coverage of each cell, feathered.

    ``mask`` is the boolean mask at the image's size; it is padded to a square as the image
    is, area-averaged to ``latent_hw``, then ``w = max(coverage, blur(coverage))`` with a
    Gaussian of σ = ``feather`` cells (truncated at 2σ): the object keeps weight 1, a soft
    halo reaches outwards, cells farther than ⌈2σ⌉ from the object stay exactly 0.
    """
    if feather < 0 or not math.isfinite(feather):
        raise InputError(f"feather must be a finite number ≥ 0, got {feather!r}")
    m = torch.from_numpy(square_mask(mask).astype(np.float32))[None, None]
    coverage = F.adaptive_avg_pool2d(m, latent_hw)
    if feather == 0:
        return coverage
    radius = max(1, math.ceil(2 * feather))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * feather**2))
    k = k / k.sum()
    blurred = F.conv2d(F.pad(coverage, (radius,) * 4), k.view(1, 1, 1, -1))
    blurred = F.conv2d(blurred, k.view(1, 1, -1, 1))
    return torch.maximum(coverage, blurred).clamp(0.0, 1.0)


def flip_mask(mask: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(mask[:, ::-1])


def save_mask(path: str | Path, mask: np.ndarray, *, overwrite: bool) -> Path:
    """Write a mask as a black/white PNG atomically."""
    import io

    from lib_ostaf.files.atomic import atomic_write

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return atomic_write(path, buf.getvalue(), overwrite=overwrite)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# --------------------------------------------------------------------------- auto masks


def auto_masks(image: Image.Image, n_objects: int = 1, *, iterations: int = 5) -> list[np.ndarray]:
    """``n_objects`` boolean masks (largest connected objects, ordered left to right).

    GrabCut is initialised with the border strip as sure background, the border-contrast
    salient pixels as probable foreground and the rest as probable background. Raises
    InputError when it finds fewer objects than asked (give masks then).
    """
    import cv2

    if n_objects < 1:
        raise InputError("auto_masks needs at least one object")
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    h, w = rgb.shape[:2]
    saliency = border_contrast(rgb)
    level = _otsu(saliency)
    salient = saliency > level
    margin = max(2, round(0.03 * min(h, w)))
    border = np.zeros((h, w), dtype=bool)
    border[:margin], border[-margin:], border[:, :margin], border[:, -margin:] = (True,) * 4

    init = np.where(salient, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    init[border] = cv2.GC_BGD
    fg = salient & ~border
    if fg.any() and (~fg).any():
        cv2.setRNGSeed(0)  # GrabCut's GMM initialisation draws from OpenCV's global RNG
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        try:
            cv2.grabCut(bgr, init, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
        except cv2.error as exc:  # degenerate colour statistics
            log.warning("GrabCut failed (%s); using the saliency threshold", exc)
        fg = (init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)

    fg = _clean(fg.astype(np.uint8))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(fg, connectivity=8)
    min_area = max(4, int(0.002 * h * w))
    parts = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    parts.sort(key=lambda i: -int(stats[i, cv2.CC_STAT_AREA]))
    if len(parts) < n_objects:
        raise InputError(
            f"the automatic mask found {len(parts)} object(s) but {n_objects} were asked; "
            "give one mask per object"
        )
    chosen = sorted(parts[:n_objects], key=lambda i: float(centroids[i][0]))
    masks = [labels == i for i in chosen]
    for k, m in enumerate(masks):
        check_mask(m, f"automatic mask {k + 1}")
    return masks


def border_contrast(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel colour distance (CIELAB) to the median colour of the image border."""
    import cv2

    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    ring = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    background = np.median(ring, axis=0)
    return np.linalg.norm(lab - background, axis=-1)


def _otsu(values: np.ndarray) -> float:
    import cv2

    hi = float(values.max())
    if hi <= 0:
        return 0.0
    scaled = np.clip(values / hi * 255, 0, 255).astype(np.uint8)
    level, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(level) / 255 * hi


def _clean(fg: np.ndarray) -> np.ndarray:
    """Open/close with a small kernel, then fill holes (what the border cannot reach)."""
    import cv2

    h, w = fg.shape
    size = max(3, (min(h, w) // 100) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, kernel)
    flood = np.pad(fg, 1).copy()
    fill = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(flood, fill, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return (fg.astype(bool) | holes).astype(np.uint8)


def mask_from_editor(value: object) -> Image.Image | np.ndarray | None:
    """What a gradio mask input returns → a mask source, or None when nothing was given.

    * an image or array (an uploaded mask file): as it is;
    * gradio 3 ``tool="sketch"`` → ``{"image", "mask"}``: the drawn ``mask``;
    * gradio 4 ``ImageEditor`` → ``{"background", "layers", "composite"}``: every painted
      pixel of every layer (its alpha), whatever the brush colour.
    A drawing with no painted pixel counts as no mask.
    """
    if value is None:
        return None
    if isinstance(value, (Image.Image, np.ndarray)):
        return value
    if not isinstance(value, dict):
        raise InputError(f"unexpected mask input of type {type(value).__name__}")
    if "layers" in value:
        painted = None
        for layer in value.get("layers") or []:
            if layer is None:
                continue
            alpha = np.asarray(_pil(layer).convert("RGBA"))[..., 3] > 0
            painted = alpha if painted is None else painted | alpha
        if painted is None or not painted.any():
            return None
        return Image.fromarray(painted.astype(np.uint8) * 255)
    mask = value.get("mask")
    if mask is None:
        return None
    grey = np.asarray(_pil(mask).convert("L"))
    return Image.fromarray(grey) if grey.max() > 0 else None


def _pil(value: object) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, (str, Path)):
        with Image.open(value) as im:
            im.load()
            return im.copy()
    raise InputError(f"unexpected image value of type {type(value).__name__}")


def mask_overlay(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, Image.Image]:
    """(the image with the mask tinted red, the mask as a white-on-black image)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size)) > 127
    tinted = rgb.copy()
    tinted[m] = 0.5 * rgb[m] + 0.5 * np.array([255.0, 0.0, 0.0])
    return Image.fromarray(tinted.round().astype(np.uint8)), Image.fromarray(
        m.astype(np.uint8) * 255
    )
