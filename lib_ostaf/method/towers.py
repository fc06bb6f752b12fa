"""Finding a CLIP image tower on this machine for the prototypical embedding.

Only folders already on disk are looked at (never a download): the local Hugging Face cache
(``HF_HUB_CACHE`` / ``HUGGINGFACE_HUB_CACHE`` / ``HF_HOME``/hub / ``~/.cache/huggingface/hub``)
and folders a WebUI user already keeps (IP-Adapter image encoders: ``models/clip_vision``,
``models/ipadapter``, ...). A folder is a candidate when its ``config.json`` is a CLIP model
whose CLIP space is one of the loaded text encoders' (:func:`tower_fit`); only
``config.json`` is read here, the weights are loaded later (``objects.ClipTower.load``).
No WebUI imports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
# Preferred first when several fit (the CLIPs Stable Diffusion's text encoders come from).
KNOWN_REPOS = (
    "openai/clip-vit-large-patch14",  # SD1.x, SDXL CLIP-L
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # SD2.x
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",  # SDXL CLIP-G
)
MAX_DEPTH = 3  # below a WebUI folder: models/ipadapter/<name>/image_encoder/config.json


@dataclass
class TowerSearch:
    """The outcome of :func:`find_tower`: the folder (or None), and every folder skipped
    with its reason."""

    folder: Path | None
    reason: str = ""  # why this one was chosen, or why none
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def note(self) -> str:
        """One line for the log and the card."""
        if self.folder is not None:
            return f"CLIP image tower {self.folder} ({self.reason}, found automatically)"
        text = f"no CLIP image tower found ({self.reason})"
        if self.skipped:
            shown = "; ".join(f"{p}: {r}" for p, r in self.skipped[:4])
            more = f"; {len(self.skipped) - 4} more" if len(self.skipped) > 4 else ""
            text += f"; skipped {shown}{more}"
        return text


def hf_cache_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """The local Hugging Face hub cache folders, in the order transformers looks."""
    env = os.environ if env is None else env
    found: list[Path] = []
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            found.append(Path(env[key]).expanduser())
    if env.get("HF_HOME"):
        found.append(Path(env["HF_HOME"]).expanduser() / "hub")
    xdg = env.get("XDG_CACHE_HOME")
    if xdg:
        found.append(Path(xdg).expanduser() / "huggingface" / "hub")
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    found.append(home / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(found))


def _known_rank(path: Path) -> int:
    text = str(path).lower()
    for i, repo in enumerate(KNOWN_REPOS):
        if "models--" + repo.lower().replace("/", "--") in text:
            return i
    return len(KNOWN_REPOS)


def cache_folders(cache: Path) -> Iterator[Path]:
    """Snapshot folders of the hub cache ``cache`` (models--*/snapshots/*), known CLIPs first."""
    if not cache.is_dir():
        return
    try:
        snaps = [s for s in cache.glob("models--*/snapshots/*") if s.is_dir()]
    except OSError:
        return
    yield from sorted(snaps, key=lambda p: (_known_rank(p), str(p)))


def model_folders(root: Path, depth: int = MAX_DEPTH) -> Iterator[Path]:
    """Folders with a ``config.json`` at or below ``root`` (at most ``depth`` levels)."""
    if not root.is_dir():
        return
    if (root / "config.json").is_file():
        yield root
        return
    if depth <= 0:
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return
    for child in children:
        yield from model_folders(child, depth - 1)


def _read_config(folder: Path) -> dict[str, Any] | str:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable config.json ({exc})"
    return data if isinstance(data, dict) else "config.json is not an object"


def tower_fit(folder: Path | str, encoders: Sequence[Any]) -> tuple[bool, str]:
    """Whether the CLIP model in ``folder`` shares a CLIP space with one of ``encoders``
    (from ``config.json`` only), and why (or why not).

    A full ``CLIPModel`` brings its own text projection: its text width must equal an
    encoder's width. A ``CLIPVisionModelWithProjection`` (an IP-Adapter image encoder) pairs
    only with an encoder that has its own projection of the same width (SDXL's CLIP-G)."""
    folder = Path(folder)
    config = _read_config(folder)
    if isinstance(config, str):
        return False, config
    model_type = str(config.get("model_type", ""))
    if not any((folder / w).is_file() for w in WEIGHTS):
        return False, "no weights (model.safetensors / pytorch_model.bin) next to config.json"
    widths = ", ".join(f"{e.key} {e.width}" for e in encoders) or "no text encoder"
    if model_type == "clip":
        text = config.get("text_config") or config.get("text_config_dict") or {}
        width = int(text.get("hidden_size", 512))
        for enc in encoders:
            if int(enc.width) == width:
                return True, f"CLIPModel, text width {width} = {enc.key}"
        return False, f"CLIPModel with text width {width} ≠ the loaded text encoders ({widths})"
    if model_type == "clip_vision_model":
        projection = int(config.get("projection_dim", 512))
        for enc in encoders:
            if enc.projection_dim is not None and int(enc.projection_dim) == projection:
                return True, f"image encoder, projection {projection} = {enc.key}'s projection"
        owns = [f"{e.key} {e.projection_dim}" for e in encoders if e.projection_dim is not None]
        return False, (
            f"image encoder with projection {projection}; no loaded text encoder has its own "
            f"projection of that width ({', '.join(owns) or 'none has one'}; text {widths})"
        )
    return False, f"not a CLIP model (model_type {model_type or 'missing'!r})"


def find_tower(
    encoders: Sequence[Any],
    folders: Sequence[Path | str] = (),
    *,
    env: Mapping[str, str] | None = None,
    use_cache: bool = True,
) -> TowerSearch:
    """The first folder with a CLIP tower for ``encoders``: below each of ``folders`` (a
    WebUI's image-encoder folders), then the local Hugging Face cache. Never downloads."""
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    roots = [Path(f).expanduser() for f in folders if str(f).strip()]
    candidates: list[Path] = [c for r in roots for c in model_folders(r)]
    caches = hf_cache_dirs(env) if use_cache else []
    candidates += [c for cache in caches for c in cache_folders(cache)]
    for folder in candidates:
        key = folder.resolve()
        if key in seen:
            continue
        seen.add(key)
        ok, why = tower_fit(folder, encoders)
        if ok:
            return TowerSearch(folder, why, skipped)
        skipped.append((folder, why))
    where = [str(r) for r in roots] + [str(c) for c in caches]
    reason = "looked in " + (", ".join(where) if where else "nothing")
    if not skipped:
        reason += "; no CLIP model folder there"
    return TowerSearch(None, reason, skipped)
