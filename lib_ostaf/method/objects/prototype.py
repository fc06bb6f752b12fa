"""The prototypical embedding (Lu, Xie, Guo 2024): a new token's start from its object's
appearance and its class.

:func:`prototype_target` is the normalized mean of the CLIP image features of the image and
of the masked object and the CLIP text feature of "a photo of a {class}";
:func:`prototypical_embedding` reaches it by optimising only the token's row (cosine loss).
No CLIP image tower → the class word's embedding (:data:`FALLBACK`, :func:`class_word_vectors`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lib_ostaf.errors import InputError
from lib_ostaf.method.embeddings import _splice as splice_rows
from lib_ostaf.method.embeddings import _split as split_prompt
from lib_ostaf.method.host import Host
from lib_ostaf.method.images import square
from lib_ostaf.method.masks import resize_mask
from lib_ostaf.method.towers import find_tower

PROTOTYPE = "prototype"
FALLBACK = "class-word-fallback"
# CLIP's image normalisation (OpenAI and OpenCLIP towers alike).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipTower:
    """A CLIP image tower (``CLIPModel`` or ``CLIPVisionModelWithProjection``) for the
    prototypical embedding. A full ``CLIPModel`` also brings its text projection (SD1's
    text encoder has none); a vision-only tower pairs with an encoder that has its own
    projection of the same width (SDXL's CLIP-G)."""

    def __init__(self, model: torch.nn.Module, *, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        self.model = model.eval().requires_grad_(False)
        config = model.config
        vision = getattr(config, "vision_config", config)
        self.image_size = int(vision.image_size)
        self.projection_dim = int(model.visual_projection.out_features)
        self.text_projection = getattr(model, "text_projection", None)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.name = str(getattr(config, "_name_or_path", "") or type(model).__name__)

    @classmethod
    def load(cls, source: str | Path, *, local_only: bool = True) -> ClipTower:
        """From a folder (``config.json`` of a CLIPModel or CLIPVisionModelWithProjection)
        or, with ``local_only``, a Hugging Face id already in the local cache."""
        from transformers import CLIPModel, CLIPVisionModelWithProjection
        from transformers.utils import logging as hf_logging

        path = Path(source)
        model_type = ""
        if path.is_dir():
            try:
                model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
            except (OSError, ValueError) as exc:
                raise InputError(f"{path} is not a CLIP model folder: {exc}") from None
        elif path.exists():
            raise InputError(f"{path}: give the CLIP image tower as a model folder")
        model_cls = (
            CLIPVisionModelWithProjection if model_type == "clip_vision_model" else CLIPModel
        )
        hf_logging.disable_progress_bar()
        try:
            model = model_cls.from_pretrained(str(source), local_files_only=local_only)
        except Exception as exc:  # OSError, ValueError, ... from transformers
            raise InputError(f"could not load a CLIP image tower from {source}: {exc}") from exc
        finally:
            hf_logging.enable_progress_bar()
        mean, std = CLIP_MEAN, CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            with contextlib.suppress(OSError, ValueError, TypeError):
                cfg = json.loads(pre.read_text())
                mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        return cls(model, mean=mean, std=std)

    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected image embeddings ``[N, projection_dim]`` (not normalized)."""
        size = self.image_size
        arrays = [np.asarray(square(im, size), dtype=np.float32) / 255.0 for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        x = ((x - self.mean) / self.std).to(self.device(), next(self.model.parameters()).dtype)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return self.model.visual_projection(pooled).float()

    def match(self, encoders: Sequence[Any]) -> int | str:
        """Index of the text encoder whose CLIP space this tower shares, or the reason none.

        A full CLIPModel pairs only with an encoder that is its text tower (same token
        rows, :meth:`same_text`): its text projection is applied to that encoder's pooled
        feature. An encoder without its own pooled feature (a WebUI's, ``has_pooled``
        False) then gets it from the tower's own text model (:meth:`text_feature`)."""
        reasons: list[str] = []
        for i, enc in enumerate(encoders):
            own = getattr(enc, "has_pooled", True)
            if self.text_projection is not None:
                if self.text_projection.in_features != enc.width:
                    continue
                why = self.same_text(enc)
                if why:
                    reasons.append(why)
                    continue
                return i
            elif enc.projection_dim == self.projection_dim:
                if own:
                    return i
                reasons.append(
                    f"{enc.key} gives no pooled feature in this WebUI; an image-only tower "
                    "needs one (give a full CLIPModel folder)"
                )
        if reasons:
            return "; ".join(reasons)
        widths = ", ".join(f"{e.key} {e.width}" for e in encoders)
        if self.text_projection is None:
            return (
                f"the image tower (projection {self.projection_dim}) matches no text encoder "
                f"with its own projection ({widths}); give a full CLIPModel folder"
            )
        return f"the CLIP model's text width {self.text_projection.in_features} ≠ {widths}"

    def same_text(self, encoder: Any, text: str = "a photo of a dog on the table") -> str:
        """ "" when this CLIPModel's token table agrees with ``encoder``'s rows for ``text``
        (mean cosine ≥ 0.9: the same text encoder, perhaps fine-tuned), else the reason."""
        table = self.model.text_model.embeddings.token_embedding.weight
        ids_of = getattr(encoder, "ids", None) or encoder.word_ids
        ids = [int(i) for i in ids_of(text)]
        if not ids or max(ids) >= table.shape[0]:
            return f"the CLIP model's vocabulary is not {encoder.key}'s"
        mine = table[torch.tensor(ids, device=table.device)].detach().float().cpu()
        theirs = encoder.word_vectors(text)[: len(ids)].detach().float().cpu()
        if theirs.shape != mine.shape:
            return f"the CLIP model's vocabulary is not {encoder.key}'s"
        cos = float(F.cosine_similarity(mine, theirs, dim=-1).mean())
        if cos < 0.9:
            return (
                f"the CLIP model's text tower is not the loaded {encoder.key} "
                f"(token rows' cosine {cos:.2f} < 0.9)"
            )
        return ""

    def text_feature(self, encoder: Any, prompt: str, vectors: dict | None) -> torch.Tensor:
        """The prompt's pooled (EOS) feature in this tower's CLIP space (differentiable)."""
        if self.text_projection is not None and not getattr(encoder, "has_pooled", True):
            pooled = self._own_pooled(encoder, prompt, vectors)
            weight = self.text_projection.weight
            return F.linear(pooled.float(), weight.to(pooled.device, torch.float32))
        if self.text_projection is not None:
            pooled = encoder.pooled(prompt, vectors, project=False)
            weight = self.text_projection.weight
            return F.linear(pooled.float(), weight.to(pooled.device, torch.float32))
        return encoder.pooled(prompt, vectors, project=True).float()

    def _own_pooled(self, encoder: Any, prompt: str, vectors: dict | None) -> torch.Tensor:
        """The EOS feature of ``prompt`` through this CLIPModel's own text model, with the
        encoder's token ids and ``vectors`` spliced in (for a WebUI's encoder, which has
        none; :meth:`same_text` checked the two agree)."""
        text_model = self.model.text_model
        cfg = self.model.config.text_config
        bos, eos = int(cfg.bos_token_id), int(cfg.eos_token_id)
        vectors = dict(vectors or {})
        body: list[int] = []
        slots: list[tuple[int, str, int]] = []
        for piece, token in split_prompt(prompt, list(vectors)):
            if token is None and piece.strip():
                body.extend(int(i) for i in encoder.ids(piece))
            elif token is not None:
                for j in range(vectors[token].shape[0]):
                    slots.append((1 + len(body), token, j))
                    body.append(bos)
        limit = int(cfg.max_position_embeddings)
        body = body[: limit - 2]
        slots = [s for s in slots if s[0] < limit - 1]
        device = next(self.model.parameters()).device
        ids = torch.tensor([[bos, *body, eos]], device=device)
        with splice_rows(text_model.embeddings.token_embedding, slots, vectors):
            return text_model(input_ids=ids).pooler_output[0]


def resolve_tower(
    clip: str | Path | ClipTower | torch.nn.Module | None,
    host: Host,
    search: Sequence[str | Path] = (),
) -> tuple[ClipTower | None, str]:
    """(tower, note): a tower object, a folder, "auto" (below the ``search`` folders, then
    the local Hugging Face cache: :func:`lib_ostaf.method.towers.find_tower`), or none."""
    if isinstance(clip, ClipTower):
        return clip, clip.name
    if isinstance(clip, torch.nn.Module):
        return ClipTower(clip), type(clip).__name__
    if clip is None or str(clip).lower() in ("", "none"):
        return None, "no CLIP image tower given"
    if str(clip).lower() == "auto":
        found = find_tower(list(host.text_encoders), list(search))
        if found.folder is None:
            return None, found.note()
        return ClipTower.load(found.folder), found.note()
    return ClipTower.load(clip), f"CLIP image tower {clip}"


def masked_object(image: Image.Image, mask: np.ndarray, margin: float = 0.1) -> Image.Image:
    """The object alone: bounding box (+ margin) of the mask, background painted white.

    A mask of another size than the image is resized to it (as :func:`load_mask` does)."""
    mask = resize_mask(mask, image.size)
    if not mask.any():
        raise InputError("the object's mask is empty at the model's resolution")
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    pad_y, pad_x = (
        int(margin * (rows.max() - rows.min() + 1)),
        int(margin * (cols.max() - cols.min() + 1)),
    )
    y0, y1 = max(0, rows.min() - pad_y), min(h, rows.max() + 1 + pad_y)
    x0, x1 = max(0, cols.min() - pad_x), min(w, cols.max() + 1 + pad_x)
    a = np.asarray(image.convert("RGB")).copy()
    a[~mask] = 255
    return Image.fromarray(a[y0:y1, x0:x1])


def prototype_target(
    tower: ClipTower,
    encoder: Any,
    image: Image.Image,
    mask: np.ndarray,
    class_prompt: str,
) -> torch.Tensor:
    """The prototype: normalized mean of the normalized CLIP features of the image, of the
    masked object and of the class prompt's text."""
    images = tower.image_features([image, masked_object(image, mask)])
    with torch.no_grad():
        text = tower.text_feature(encoder, class_prompt, None)
    parts = torch.cat([F.normalize(images, dim=-1), F.normalize(text[None].to(images), dim=-1)])
    return F.normalize(parts.mean(0), dim=0)


@dataclass
class PrototypeInfo:
    """How a token was initialised (recorded in the file's metadata)."""

    token: str
    method: str  # PROTOTYPE | FALLBACK
    encoder: str = ""  # key of the text encoder that was optimised ("clip_g", ...)
    cos_class_word: float | None = None  # cos(text feature with the class word, prototype)
    cos_prototype: float | None = None  # same after the optimisation
    note: str = ""


def prototypical_embedding(
    tower: ClipTower,
    encoder: Any,
    target: torch.Tensor,
    token: str,
    init: torch.Tensor,
    prompt: str,
    *,
    steps: int,
    lr: float,
) -> tuple[torch.Tensor, float, float]:
    """Optimise only the token's row so that ``prompt``'s pooled text feature turns toward
    ``target`` (loss 1 − cos). The row keeps the class word's norm (stays in the range of
    real word embeddings); the best row seen is returned with (cos at init, cos at best)."""
    device = target.device
    row = init.detach().clone().float().to(device).requires_grad_(True)
    norm = init.detach().float().to(device).norm(dim=-1, keepdim=True)
    optimizer = torch.optim.Adam([row], lr=lr)
    best, best_cos, first = row.detach().clone(), -2.0, None
    for step in range(steps + 1):
        feature = tower.text_feature(encoder, prompt, {token: row})
        cos = F.cosine_similarity(feature.to(device), target, dim=0)
        value = float(cos.detach())
        if first is None:
            first = value
        if value > best_cos:
            best, best_cos = row.detach().clone(), value
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        (1.0 - cos).backward()
        optimizer.step()
        with torch.no_grad():
            row.mul_(norm / row.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return best, float(first), best_cos


def class_word_vectors(host: Host, class_name: str) -> tuple[torch.Tensor, ...]:
    """The class word's embedding per text encoder: mean of its token rows, ``[1, width]``."""
    return tuple(enc.word_vectors(class_name).mean(0, keepdim=True) for enc in host.text_encoders)
