"""The A1111 sidecars of an adapter: the ``.json`` card and the ``.preview.png`` image."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from lib_ostaf.errors import InputError
from lib_ostaf.files.atomic import atomic_write
from lib_ostaf.files.filenames import ADAPTER_SUFFIX, CARD_SUFFIX, PREVIEW_SUFFIX, validate_name

if TYPE_CHECKING:
    from PIL import Image

_SD_VERSIONS = ("SD1", "SD2", "SDXL", "Unknown")


def _sidecar(stem_path: str | Path, suffix: str) -> Path:
    p = Path(stem_path)
    stem = p.name[: -len(ADAPTER_SUFFIX)] if p.name.endswith(ADAPTER_SUFFIX) else p.name
    validate_name(stem)
    return p.parent / (stem + suffix)


def write_card(
    stem_path: str | Path,
    *,
    preferred_weight: float,
    activation_text: str,
    description: str,
    sd_version: str,
    notes: str = "",
    overwrite: bool,
) -> Path:
    """Write the A1111 card ``<stem>.json`` (``stem_path`` may also end in .safetensors)."""
    data = card_bytes(
        preferred_weight=preferred_weight,
        activation_text=activation_text,
        description=description,
        sd_version=sd_version,
        notes=notes,
    )
    return atomic_write(_sidecar(stem_path, CARD_SUFFIX), data, overwrite=overwrite)


def card_bytes(
    *,
    preferred_weight: float,
    activation_text: str,
    description: str,
    sd_version: str,
    notes: str = "",
) -> bytes:
    """The A1111 card's JSON (UTF-8); InputError for a bad sd version or weight."""
    if sd_version not in _SD_VERSIONS:
        raise InputError(f"sd_version must be one of {_SD_VERSIONS}, got {sd_version!r}.")
    weight = float(preferred_weight)
    if not math.isfinite(weight):
        raise InputError(f"Preferred weight must be a finite number, got {preferred_weight!r}.")
    card = {
        "description": str(description),
        "sd version": sd_version,
        "activation text": str(activation_text),
        "preferred weight": weight,
        "negative text": "",
        "notes": str(notes),
    }
    return json.dumps(card, indent=4, ensure_ascii=False).encode("utf-8")


def write_preview(stem_path: str | Path, image: Image.Image, *, overwrite: bool) -> Path:
    """Write the A1111 preview ``<stem>.preview.png`` atomically."""
    from PIL import Image as PILImage

    if not isinstance(image, PILImage.Image):
        raise InputError(f"Preview must be a PIL image, got {type(image).__name__}.")
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write(_sidecar(stem_path, PREVIEW_SUFFIX), buf.getvalue(), overwrite=overwrite)
