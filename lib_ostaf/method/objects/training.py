"""Object implantation (Lu, Xie, Guo 2024): one image, one or several objects, each a new word.

The paper's three parts, by their names (our reconstruction of each: docs/method.md):

* **prototypical embedding** — :func:`prototype_target` + :func:`prototypical_embedding`:
  the new token starts from the object's appearance and its class: the normalized mean of
  CLIP image features of the image and of the masked object and the CLIP text feature of
  "a photo of a {class}", reached by optimising only the token's row (cosine loss). No CLIP
  image tower → the class word's embedding (``class-word-fallback``, logged and recorded).
* **class-characterizing regularization** — :func:`prior_preservation_loss` (adapted vs
  frozen base model on the class prompt, same x_t and t; image-free) +
  :func:`anchor_loss` (each token no farther from its class word than it started).
* **object-specific loss** — :func:`object_loss`: the diffusion loss weighted by the union
  of the masks of the objects named in the step's prompt; a random subset of objects per
  step ("a photo of <o1> and <o2>").

What is trained: rank-r LoRA factors on the UNet attention (:class:`~.hypernet.DirectLoRA`
through :class:`~.offsets.OffsetHooks`) plus the token vectors (own learning rate),
optionally after a first phase that trains the vectors alone. The loop is the attribute
trainer's (:func:`lib_ostaf.method.train.run_steps`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lib_ostaf import __version__
from lib_ostaf.errors import IncompatibleModelError, InputError, TrainingDiverged
from lib_ostaf.files.adapter_file import (
    ADAPTER_SUFFIX,
    PREVIEW_SUFFIX,
    STATE_SUFFIX,
    LoraModule,
    atomic_write,
    build_metadata,
    content_hashes,
    lora_state_dict,
    save_adapter,
    sd_version_label,
    validate_name,
    write_card,
    write_preview,
)
from lib_ostaf.files.adapter_file import save_state as write_state
from lib_ostaf.files.naming import UNetInfo, block_part, inspect_unet
from lib_ostaf.method.embeddings import (
    EMBEDDINGS_FOLDER,
    bundle_state_dict,
    check_new_tokens,
    file_stem,
    portable_keys,
    save_embedding,
)
from lib_ostaf.method.embeddings import _splice as splice_rows
from lib_ostaf.method.embeddings import _split as split_prompt
from lib_ostaf.method.host import Host
from lib_ostaf.method.hypernet import OFFSET_NETWORKS, HypernetConfig, LayerShape
from lib_ostaf.method.images import load_image, square
from lib_ostaf.method.masks import (
    MaskSource,
    auto_masks,
    flip_mask,
    latent_weights,
    load_mask,
    resize_mask,
    save_mask,
    square_mask,
)
from lib_ostaf.method.memory import check_options, training_options
from lib_ostaf.method.offsets import OffsetHooks, check_lambda
from lib_ostaf.method.targets import (
    PARTS,
    Target,
    TargetSpec,
    available_blocks,
    find_module,
    select_targets,
)
from lib_ostaf.method.towers import find_tower
from lib_ostaf.method.train import (
    Callbacks,
    check_finite_base,
    check_finite_factors,
    check_finite_probe,
    detached_factors,
    factors_to_modules,
    finite,
    frozen,
    noisy_latents,
    run_steps,
)

log = logging.getLogger(__name__)

PROTOTYPE = "prototype"
FALLBACK = "class-word-fallback"
# CLIP's image normalisation (OpenAI and OpenCLIP towers alike).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BUNDLE_INFIX = ".a1111"  # <name>.a1111.safetensors: LoRA + bundle_emb for A1111
MASK_INFIX = ".mask-"  # <name>.mask-<token>.png (automatic masks)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ObjectSpec:
    """One object to implant: its new token, its class word and its mask (None → auto)."""

    token: str
    class_name: str
    mask: MaskSource | None = None


def objects_from_lists(
    tokens: Sequence[str], classes: Sequence[str], masks: Sequence[MaskSource] = ()
) -> list[ObjectSpec]:
    """Pair parallel lists (CLI / UI): one class per token; one mask per token or none."""
    tokens, classes, masks = list(tokens), list(classes), list(masks)
    if not tokens:
        raise InputError("give at least one object: a token and a class")
    if len(classes) != len(tokens):
        raise InputError(f"{len(tokens)} token(s) but {len(classes)} class name(s); give one each")
    if len(masks) > len(tokens):
        raise InputError(f"{len(masks)} masks for {len(tokens)} token(s); one mask per object")
    if masks and len(masks) != len(tokens):
        raise InputError(
            f"{len(masks)} mask(s) for {len(tokens)} objects: give a mask for every object, "
            "or none for automatic masks"
        )
    return [
        ObjectSpec(t, c, masks[i] if masks else None)
        for i, (t, c) in enumerate(zip(tokens, classes, strict=True))
    ]


@dataclass(frozen=True)
class ObjectConfig:
    """Settings of one implantation. Defaults are for real SD checkpoints (docs/method.md)."""

    steps: int = 400  # joint phase: LoRA + token vectors
    embedding_steps: int = 100  # first phase: token vectors alone (0 = none)
    rank: int = 4
    lr: float = 1e-4  # LoRA factors
    embedding_lr: float = 5e-4  # token vectors (0 = keep the initialisation)
    class_weight: float = 1.0  # class-characterizing regularization; 0 disables it
    anchor_weight: float = 0.01  # inside it: the token's drift from its class word (relative)
    background_weight: float = 0.0  # loss weight outside the objects' masks
    feather: float = 1.0  # soft mask halo, σ in latent cells
    flip: bool = True  # mirrored view (image and masks)
    prompt: str = "a photo of {tokens}"  # {tokens}: the step's tokens joined with " and "
    class_prompt: str = "a photo of a {class}"
    clip: str = "auto"  # CLIP image tower: "auto" (local cache only), "none", or a folder
    prototype_steps: int = 100
    prototype_lr: float = 1e-2
    seed: int = 0
    network: str = "lora"  # DirectLoRA; "hypernet" also works
    parts: tuple[str, ...] = ("encoder", "mid", "decoder")
    attn: tuple[str, ...] = ("attn1", "attn2")
    proj: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    blocks: tuple[str, ...] | None = None  # expert override: explicit diffusers block ids
    timestep_range: tuple[float, float] = (0.0, 1.0)
    default_lambda: float = 1.0
    n_probe: int = 8  # fixed (view, t, noise) triples per probe set
    preview_every: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (lib_ostaf.method.memory)
    gradient_checkpointing: str = "auto"  # auto | on | off

    def __post_init__(self) -> None:
        check_options(self.precision, self.gradient_checkpointing)
        for name in ("steps", "rank", "n_probe"):
            _positive_int(name, getattr(self, name))
        for name in ("embedding_steps", "prototype_steps", "preview_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be an integer ≥ 0, got {value!r}")
        for name in ("lr", "prototype_lr"):
            _rate(name, getattr(self, name), allow_zero=False)
        _rate("embedding_lr", self.embedding_lr, allow_zero=True)
        for name in ("class_weight", "anchor_weight", "background_weight", "feather"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if self.background_weight > 1:
            raise InputError("background_weight must be in [0, 1]")
        if "{tokens}" not in self.prompt:
            raise InputError("the training prompt must contain {tokens}")
        if "{class}" not in self.class_prompt:
            raise InputError("the class prompt must contain {class}")
        if self.network not in OFFSET_NETWORKS:
            raise InputError(f"network must be one of {', '.join(OFFSET_NETWORKS)}")
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise InputError(f"parts must be a non-empty subset of {', '.join(PARTS)}")
        lo, hi = self.timestep_range
        if not 0.0 <= lo < hi <= 1.0:
            raise InputError(
                f"timestep_range must satisfy 0 ≤ lo < hi ≤ 1, got {self.timestep_range}"
            )
        check_lambda(self.default_lambda)

    def prompt_for(self, tokens: Sequence[str]) -> str:
        return self.prompt.replace("{tokens}", " and ".join(tokens))

    def class_prompt_for(self, word: str) -> str:
        return self.class_prompt.replace("{class}", word)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


def _rate(name: str, value: object, *, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0 <= value < 1) or (value == 0 and not allow_zero):  # type: ignore[operator]
        raise InputError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1), got {value!r}")


def with_overrides(config: ObjectConfig, **changes: Any) -> ObjectConfig:
    """A copy of ``config`` with the non-None fields changed (validated again)."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})


# --------------------------------------------------------------------------- losses


def object_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Object-specific loss: ``Σ w·(pred − target)² / (C · Σ w)``, a weighted mean.

    ``weights`` [B, 1, h, w] on the latent grid (mask union, + background weight). Where
    w = 0 nothing counts, not even a NaN/∞ prediction there.
    """
    w = weights.to(pred.device, torch.float32).expand_as(pred)
    err = (pred.float() - target.float()).pow(2)
    weighted = torch.where(w > 0, err * w, torch.zeros_like(err))
    total = w.sum()
    if float(total) <= 0:
        raise InputError("the object loss has no pixel to supervise (empty mask)")
    return weighted.sum() / total


def prior_preservation_loss(adapted: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """‖ε_adapted − ε_base‖² on the class prompt: 0 exactly when the adapter is 0."""
    return F.mse_loss(adapted.float(), base.float().detach())


def relative_distance(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """‖v − c‖² / ‖c‖²: scale-free, so one weight fits every text encoder."""
    c = c.to(v.device, torch.float32)
    return (v.float() - c).pow(2).sum() / c.pow(2).sum().clamp_min(1e-12)


def anchor_loss(
    vectors: Sequence[torch.Tensor],
    class_vectors: Sequence[torch.Tensor],
    margins: Sequence[float] | None = None,
) -> torch.Tensor:
    """Keep each token near its class word: mean over text encoders of
    ``max(0, ‖e − e_class‖²/‖e_class‖² − margin)``. The margin is the distance the token
    started at (its prototypical initialisation), so the anchor never undoes the prototype;
    it only stops the token drifting farther from its class. 0 at the start."""
    margins = margins if margins is not None else [0.0] * len(vectors)
    terms = [
        F.relu(relative_distance(v, c) - m)
        for v, c, m in zip(vectors, class_vectors, margins, strict=True)
    ]
    return torch.stack(terms).mean()


def class_regularization(
    host: Host,
    hooks: OffsetHooks,
    x_t: torch.Tensor,
    t: torch.Tensor,
    class_cond: Any,
    vectors: Sequence[torch.Tensor],
    class_vectors: Sequence[torch.Tensor],
    anchor_weight: float,
    margins: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prior preservation, anchor) for one object: the base prediction with the offsets
    switched off (scale 0, no grad), the adapted one with them on, same x_t and t."""
    scale = hooks.scale
    try:
        hooks.scale = 0.0
        with torch.no_grad():
            base = host.predict_noise(x_t, t, class_cond)
    finally:
        hooks.scale = scale
    adapted = host.predict_noise(x_t, t, class_cond)
    prior = prior_preservation_loss(adapted, base)
    zero = prior.new_zeros(())
    anchor = anchor_loss(vectors, class_vectors, margins) if anchor_weight else zero
    return prior, anchor


# --------------------------------------------------------------------------- prototype


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


# --------------------------------------------------------------------------- training


@dataclass
class ObjectResult:
    config: ObjectConfig
    tokens: list[str]
    classes: list[str]
    embeddings: dict[str, tuple[torch.Tensor, ...]]  # trained vectors, float32 CPU
    initial_embeddings: dict[str, tuple[torch.Tensor, ...]]
    network: torch.nn.Module
    targets: list[Target]
    info: UNetInfo
    losses: list[float]  # total loss per step (both phases)
    terms: dict[str, list[float]]  # per step: object, prior, anchor
    probe: dict[str, tuple[float, float]]  # label → (before, after) object loss on fixed draws
    prototypes: list[PrototypeInfo]
    masks: list[np.ndarray]  # boolean, at the image's size
    auto_masked: list[bool]
    seconds: float
    host_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prototype_method(self) -> str:
        return PROTOTYPE if all(p.method == PROTOTYPE for p in self.prototypes) else FALLBACK

    def prototype_summary(self) -> str:
        """One line for the card and the log: the tower used, or why it fell back."""
        notes = list(dict.fromkeys(p.note for p in self.prototypes if p.note))
        if self.prototype_method == PROTOTYPE:
            encoders = ", ".join(dict.fromkeys(p.encoder for p in self.prototypes))
            return f"prototypical embedding ({encoders}) from {'; '.join(notes)}"
        return "fell back to the class word: " + ("; ".join(notes) or "no CLIP image tower")

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return detached_factors(self.network)

    def lora_modules(self) -> dict[str, LoraModule]:
        return factors_to_modules(self.factors())


def _subset(n: int, generator: torch.Generator) -> list[int]:
    """A uniformly random non-empty subset of range(n), in random order."""
    if n == 1:
        return [0]
    code = int(torch.randint(1, 2**n, (1,), generator=generator))
    members = [k for k in range(n) if code >> k & 1]
    return [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]


def _check_objects(host: Host, objects: Sequence[ObjectSpec]) -> None:
    if not getattr(host, "text_encoders", None):
        raise IncompatibleModelError(
            f"{type(host).__name__} does not expose its text encoders; object implantation "
            "needs encode_prompt(prompt, embeddings) and text_encoders (method/host.py)"
        )
    if not objects:
        raise InputError("give at least one object (token, class, mask)")
    for o in objects:
        if not isinstance(o.class_name, str) or not o.class_name.strip():
            raise InputError(f"the class name of {o.token!r} is empty; say what it is, e.g. 'mug'")
    check_new_tokens([o.token for o in objects], host.text_encoders)
    given = [o.mask is not None for o in objects]
    if any(given) and not all(given):
        raise InputError("give a mask for every object, or none for automatic masks")


def train_objects(
    host: Host,
    image: Image.Image | str | Path,
    objects: Sequence[ObjectSpec],
    config: ObjectConfig | None = None,
    callbacks: Callbacks | None = None,
    *,
    tower: ClipTower | torch.nn.Module | str | Path | None = None,
    tower_dirs: Sequence[str | Path] = (),
) -> ObjectResult:
    """Implant the objects of one image as new tokens. The host's model is left as found.

    ``tower`` overrides ``config.clip`` (a loaded :class:`ClipTower`, a transformers CLIP
    model, or a folder). With "auto", ``tower_dirs`` (a WebUI's image-encoder folders) are
    searched before the local Hugging Face cache.
    """
    config = config or ObjectConfig()
    callbacks = callbacks or Callbacks()
    started = time.perf_counter()
    _check_objects(host, objects)
    reference = load_image(image)
    tokens = [o.token for o in objects]
    classes = [o.class_name.strip() for o in objects]
    class_vecs = [class_word_vectors(host, c) for c in classes]

    # Masks: given (checked, resized) or automatic; at the image's own size.
    if objects[0].mask is not None:
        masks = [load_mask(o.mask, reference.size, label=f"mask of {o.token}") for o in objects]
        auto = [False] * len(objects)
    else:
        masks = auto_masks(reference, len(objects))
        auto = [True] * len(objects)
        log.warning("no masks given: made %d automatic mask(s) (saved with the output)", len(masks))
    for k in range(len(masks)):
        for j in range(k):
            if np.array_equal(masks[k], masks[j]):
                log.warning("%s and %s have the same mask", tokens[j], tokens[k])

    info = inspect_unet(host.unet)
    targets = select_targets(host.unet, _target_spec(host, config, info), info)
    modules = {t.kohya: find_module(host.unet, t.name) for t in targets}
    layers = [
        LayerShape(t.kohya, f"{t.attn}.{t.proj}", t.in_features, t.out_features) for t in targets
    ]

    # Views (reference, mirrored) with their masks; latents and mask weights cached.
    sq_image = square(reference, host.resolution)
    sq_masks = [square_mask(m, host.resolution) for m in masks]  # the image's geometry
    views = [(sq_image, sq_masks)]
    if config.flip:
        views.append(
            (sq_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), [flip_mask(m) for m in sq_masks])
        )
    with torch.no_grad():
        latents = torch.cat([host.encode_image(v) for v, _ in views]).float().cpu()
        class_conds = [host.encode_prompt(config.class_prompt_for(c)) for c in classes]
    latent_hw = tuple(latents.shape[-2:])
    weights = torch.stack(
        [torch.cat([latent_weights(m, latent_hw, config.feather) for m in ms]) for _, ms in views]
    )  # [views, objects, 1, h, w]

    # Prototypical embedding (or the class word), per object.
    the_tower, note = resolve_tower(tower if tower is not None else config.clip, host, tower_dirs)
    matched: int | None = None
    if the_tower is not None:
        found = the_tower.match(host.text_encoders)
        if isinstance(found, str):
            note, the_tower = f"{note} not used: {found}", None
        else:
            matched = found
    prototypes: list[PrototypeInfo] = []
    initial: dict[str, tuple[torch.Tensor, ...]] = {}
    torch.manual_seed(config.seed)
    for k, (token, cls) in enumerate(zip(tokens, classes, strict=True)):
        vecs = list(class_vecs[k])
        if the_tower is not None and matched is not None:
            encoder = host.text_encoders[matched]
            target = prototype_target(
                the_tower, encoder, sq_image, sq_masks[k], config.class_prompt_for(cls)
            )
            row, cos0, cos1 = prototypical_embedding(
                the_tower,
                encoder,
                target,
                token,
                vecs[matched],
                config.class_prompt_for(token),
                steps=config.prototype_steps,
                lr=config.prototype_lr,
            )
            vecs[matched] = row.cpu()
            prototypes.append(PrototypeInfo(token, PROTOTYPE, encoder.key, cos0, cos1, note))
        else:
            prototypes.append(PrototypeInfo(token, FALLBACK, note=note))
        initial[token] = tuple(v.detach().float().cpu().clone() for v in vecs)
    if the_tower is None:
        log.warning("%s: new tokens start from their class word's embedding (%s)", note, FALLBACK)
    del the_tower

    # Trainable parts: LoRA factors and the token vectors.
    torch.manual_seed(config.seed)
    net_cfg = HypernetConfig(rank=config.rank)
    network = OFFSET_NETWORKS[config.network](layers, net_cfg).to(host.device)
    vectors = {
        t: [torch.nn.Parameter(v.clone().to(host.device)) for v in initial[t]] for t in tokens
    }
    token_params = [p for t in tokens for p in vectors[t]]
    margins = [
        [float(relative_distance(v, c)) for v, c in zip(initial[t], class_vecs[k], strict=True)]
        for k, t in enumerate(tokens)
    ]
    for p in token_params:
        p.requires_grad_(config.embedding_lr > 0)

    n_train = len(host.alphas_cumprod)
    t_lo, t_hi = (round(f * (n_train - 1)) for f in config.timestep_range)
    generator = torch.Generator().manual_seed(config.seed)
    terms: dict[str, list[float]] = {"object": [], "prior": [], "anchor": []}
    state = {"lora": False}

    def embeddings_of(members: Sequence[int]) -> dict[str, list[torch.Tensor]]:
        return {tokens[k]: vectors[tokens[k]] for k in members}

    def step_loss(step: int) -> torch.Tensor:
        i = int(torch.randint(latents.shape[0], (1,), generator=generator))
        members = _subset(len(tokens), generator)
        t = torch.randint(t_lo, t_hi + 1, (1,), generator=generator)
        noise = torch.randn(latents[i : i + 1].shape, generator=generator)
        hooks.factors = network() if state["lora"] else {}
        cond = host.encode_prompt(
            config.prompt_for([tokens[k] for k in members]), embeddings_of(members)
        )
        x_t, target = noisy_latents(
            latents[i : i + 1], noise, t, host.alphas_cumprod, host.prediction_type
        )
        x_t = x_t.to(host.device, host.dtype)
        pred = host.predict_noise(x_t, t.to(host.device), cond)
        union = weights[i, members].amax(0)[None]
        w = union + config.background_weight * (1 - union)
        loss = object_loss(pred, target.to(pred.device), w)
        prior = anchor = loss.new_zeros(())
        if config.class_weight > 0:
            k = members[0]
            if state["lora"]:
                prior, anchor = class_regularization(
                    host, hooks, x_t, t.to(host.device), class_conds[k],
                    vectors[tokens[k]], class_vecs[k], config.anchor_weight, margins[k],
                )  # fmt: skip
            elif config.anchor_weight:
                anchor = anchor_loss(vectors[tokens[k]], class_vecs[k], margins[k])
        terms["object"].append(float(loss.detach()))
        terms["prior"].append(float(prior.detach()))
        terms["anchor"].append(float(anchor.detach()))
        return loss + config.class_weight * (prior + config.anchor_weight * anchor)

    def before_preview() -> None:
        hooks.factors = network() if state["lora"] else {}
        callbacks.preview_embeddings = {
            t: tuple(v.detach().float().cpu() for v in vectors[t]) for t in tokens
        }

    probe_sets = _probe_sets(tokens, latents.shape[0], config, t_lo, t_hi)
    first_phase = config.embedding_steps if config.embedding_lr > 0 else 0
    total = first_phase + config.steps
    losses: list[float] = []
    optimizers: list[torch.optim.Optimizer] = []
    encoders = [getattr(e, "model", None) for e in host.text_encoders]
    try:
        with (
            frozen(host.unet, *[m for m in encoders if m is not None]),
            OffsetHooks(modules) as hooks,
        ):
            before = _probe(host, hooks, {}, probe_sets, latents, weights, tokens, vectors, config)
            check_finite_base(before.values())
            options = training_options(
                host.unet, host.device, host.family, config.precision,
                config.gradient_checkpointing, compute_dtype=host.dtype,
            )  # fmt: skip
            with options as precision:
                if first_phase:
                    opt = torch.optim.AdamW(token_params, lr=config.embedding_lr, weight_decay=0.0)
                    optimizers.append(opt)
                    losses += run_steps(
                        first_phase, step_loss, opt, callbacks,
                        preview_every=config.preview_every, before_preview=before_preview,
                        total=total, precision=precision,
                    )  # fmt: skip
                state["lora"] = True
                groups = [{"params": list(network.parameters()), "lr": config.lr}]
                if config.embedding_lr > 0:
                    groups.append({"params": token_params, "lr": config.embedding_lr})
                opt = torch.optim.AdamW(groups, weight_decay=0.0)
                optimizers.append(opt)
                losses += run_steps(
                    config.steps, step_loss, opt, callbacks,
                    preview_every=config.preview_every, before_preview=before_preview,
                    first=total - config.steps, total=total, precision=precision,
                )  # fmt: skip
            with torch.no_grad():
                factors = network()
            check_finite_factors(factors)
            if not finite(*token_params):
                raise TrainingDiverged(
                    "training diverged: the token vectors are not finite; lower the token "
                    "learning rate. Nothing was written."
                )
            after = _probe(
                host, hooks, factors, probe_sets, latents, weights, tokens, vectors, config
            )
            check_finite_probe(after.values())
    finally:
        for opt in optimizers:
            opt.state.clear()
        callbacks.preview_embeddings = None

    trained = {t: tuple(p.detach().float().cpu().clone() for p in vectors[t]) for t in tokens}
    return ObjectResult(
        config=config,
        tokens=tokens,
        classes=classes,
        embeddings=trained,
        initial_embeddings=initial,
        network=network.eval(),
        targets=targets,
        info=info,
        losses=losses,
        terms=terms,
        probe={label: (before[label], after[label]) for label in before},
        prototypes=prototypes,
        masks=masks,
        auto_masked=auto,
        seconds=time.perf_counter() - started,
        host_meta={
            "base_model": host.base_model_name,
            "prediction_type": host.prediction_type,
            "resolution": host.resolution,
            "family": host.family,
        },
    )


def _target_spec(host: Host, config: ObjectConfig, info: UNetInfo) -> TargetSpec:
    blocks = config.blocks or tuple(
        b for b in available_blocks(host.unet, info) if block_part(b) in config.parts
    )
    return TargetSpec(
        attribute="appearance", attn=tuple(config.attn), proj=tuple(config.proj), blocks=blocks
    )


@dataclass
class _ProbeSet:
    members: list[int]
    view: torch.Tensor  # view index of each draw
    t: torch.Tensor  # timestep of each draw (noise: a generator seeded per call)


def _probe_sets(
    tokens: Sequence[str], n_views: int, config: ObjectConfig, t_lo: int, t_hi: int
) -> dict[str, _ProbeSet]:
    """Fixed draws: each object alone and (if several) all together."""
    subsets = [[k] for k in range(len(tokens))]
    if len(tokens) > 1:
        subsets.append(list(range(len(tokens))))
    n = config.n_probe
    return {
        config.prompt_for([tokens[k] for k in members]): _ProbeSet(
            members, torch.arange(n) % n_views, torch.linspace(t_lo, t_hi, n).round().long()
        )
        for members in subsets
    }


@torch.no_grad()
def _probe(
    host, hooks, factors, sets, latents, weights, tokens, vectors, config
) -> dict[str, float]:
    """Object loss of each probe set (label → mean) with the given offsets and vectors."""
    hooks.factors = factors
    g = torch.Generator().manual_seed(config.seed + 1)
    out = {}
    for label, s in sets.items():
        cond = host.encode_prompt(label, {tokens[k]: vectors[tokens[k]] for k in s.members})
        total = 0.0
        for j in range(len(s.t)):
            i = int(s.view[j])
            x0 = latents[i : i + 1]
            noise = torch.randn(x0.shape, generator=g)
            x_t, target = noisy_latents(
                x0, noise, s.t[j : j + 1], host.alphas_cumprod, host.prediction_type
            )
            pred = host.predict_noise(
                x_t.to(host.device, host.dtype), s.t[j : j + 1].to(host.device), cond
            )
            union = weights[i, s.members].amax(0)[None]
            total += float(object_loss(pred, target.to(pred.device), union))
        out[label] = total / len(s.t)
    return out


# --------------------------------------------------------------------------- export


@dataclass
class ObjectFiles:
    """What :func:`export_objects` wrote."""

    lora: Path
    state: Path | None  # the optional .ostaf-state sidecar (``save_state``)
    card: Path
    embeddings: dict[str, Path]
    bundle: Path | None = None
    masks: dict[str, Path] = field(default_factory=dict)
    preview: Path | None = None

    @property
    def state_path(self) -> Path:
        """Where the sidecar is (or would be) — also when this export writes none."""
        return self.lora.with_name(self.lora.name[: -len(ADAPTER_SUFFIX)] + STATE_SUFFIX)

    def all(self) -> list[Path]:
        paths = [self.lora, *([self.state] if self.state else []), self.card]
        paths += [*self.embeddings.values(), *self.masks.values()]
        if self.bundle:
            paths += [
                self.bundle,
                self.bundle.with_name(self.bundle.name[: -len(ADAPTER_SUFFIX)] + ".json"),
            ]
        return paths + ([self.preview] if self.preview else [])


def planned_files(
    out_dir: str | Path,
    name: str,
    tokens: Sequence[str],
    auto_masked: Sequence[bool],
    *,
    bundle: bool = False,
    embeddings_dir: str | Path | None = None,
    preview: bool = False,
    save_state: bool = False,
) -> ObjectFiles:
    """Where :func:`export_objects` writes (checked before training by the CLI)."""
    name = validate_name(name)
    if bundle:
        validate_name(name + BUNDLE_INFIX)
    out = Path(out_dir)
    emb_dir = (
        Path(embeddings_dir) if embeddings_dir is not None else out / (name + EMBEDDINGS_FOLDER)
    )
    return ObjectFiles(
        lora=out / (name + ADAPTER_SUFFIX),
        state=out / (name + STATE_SUFFIX) if save_state else None,
        card=out / (name + ".json"),
        embeddings={t: emb_dir / (file_stem(t) + ADAPTER_SUFFIX) for t in tokens},
        bundle=out / (name + BUNDLE_INFIX + ADAPTER_SUFFIX) if bundle else None,
        masks={
            t: out / f"{name}{MASK_INFIX}{file_stem(t)}.png"
            for t, a in zip(tokens, auto_masked, strict=True)
            if a
        },
        preview=out / (name + ".preview.png") if preview else None,
    )


def refuse_existing(files: ObjectFiles) -> None:
    """InputError naming every target that already exists (an old ``.ostaf-state`` too,
    written or not, so a sidecar never describes another adapter)."""
    paths = files.all() + ([] if files.state else [files.state_path])
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise InputError(
            f"{', '.join(existing)} already exist(s); choose another name or overwrite. "
            "Nothing was written."
        )


def export_objects(
    result: ObjectResult,
    out_dir: str | Path,
    name: str,
    *,
    overwrite: bool = False,
    bundle: bool = False,
    embeddings_dir: str | Path | None = None,
    preview: Image.Image | None = None,
    save_dtype: torch.dtype = torch.float32,
    save_state: bool = False,
) -> ObjectFiles:
    """Write the implantation: the kohya LoRA ``<name>.safetensors`` (pure kohya keys), its
    ``.json`` card, one portable embedding per token in ``embeddings_dir`` (default
    ``<out>/<name>.embeddings/<token>.safetensors``), the automatic masks
    ``<name>.mask-<token>.png`` and, with ``bundle``, the A1111 variant
    ``<name>.a1111.safetensors`` (LoRA + ``bundle_emb.*``) with its own card.
    ``save_state``: also the ``.ostaf-state`` sidecar (hypernetwork parameters and token
    vectors, for inspection; nothing reads it back). Without it, overwriting removes a
    stale sidecar of the same name.

    Every target is checked before anything is written, so a refusal loses nothing.
    """
    files = planned_files(
        out_dir,
        name,
        result.tokens,
        result.auto_masked,
        bundle=bundle,
        embeddings_dir=embeddings_dir,
        preview=preview is not None,
        save_state=save_state,
    )
    if not overwrite:
        refuse_existing(files)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = result.host_meta.get("family") or result.info.family
    cfg = result.config
    modules = result.lora_modules()
    rel = {t: _relative(p, out) for t, p in files.embeddings.items()}
    activation = ", ".join(result.tokens)
    training = asdict(cfg) | {
        "steps_done": len(result.losses),
        "seconds": round(result.seconds, 1),
    }
    ostaf = {
        "tokens": result.tokens,
        "classes": result.classes,
        "part": sorted({t.part for t in result.targets}),
        "targets": [t.kohya for t in result.targets],
        "rank": cfg.rank,
        "default_lambda": cfg.default_lambda,
        "prompt": cfg.prompt,
        "network": cfg.network,
        "base_model": result.host_meta.get("base_model", ""),
        "prototype": result.prototype_method,
        "prototype_detail": [asdict(p) for p in result.prototypes],
        "embeddings": rel,
        "masks": {
            t: ("auto" if a else "given")
            for t, a in zip(result.tokens, result.auto_masked, strict=True)
        },
        "training": training,
        "loss_probe": {k: [round(b, 6), round(a, 6)] for k, (b, a) in result.probe.items()},
        "version": __version__,
    }

    def metadata(stem: str) -> dict[str, str]:
        return build_metadata(
            name=stem,
            family=family,
            prediction_type=result.host_meta.get("prediction_type", "epsilon"),
            rank=cfg.rank,
            alpha=float(cfg.rank),
            resolution=int(result.host_meta.get("resolution", 512)),
            method="object",
            trigger_phrase=activation,
            ostaf=ostaf,
        )

    lora_md = metadata(name)  # validated before writing anything
    for token, path in files.embeddings.items():
        k = result.tokens.index(token)
        save_embedding(
            path,
            result.embeddings[token],
            family,
            metadata={
                "ostaf.token": token,
                "ostaf.class": result.classes[k],
                "ostaf.adapter": name,
                "ostaf.family": family,
                "ostaf.version": __version__,
            },
            overwrite=overwrite,
        )
    for token, path in files.masks.items():
        save_mask(path, result.masks[result.tokens.index(token)], overwrite=overwrite)
    if files.state is not None:
        state = {
            f"network.{k}": v.detach().float().cpu().contiguous()
            for k, v in result.network.state_dict().items()
        }
        for token, vecs in result.embeddings.items():
            for key, v in zip(portable_keys(family), vecs, strict=True):
                state[f"embedding.{token}.{key}"] = v
        write_state(
            files.state,
            state,
            {
                "method": "object",
                "network": cfg.network,
                "hypernet": result.network.config.to_dict(),
                "layers": [asdict(layer) for layer in result.network.layers],
                "object_config": asdict(cfg),
                "tokens": result.tokens,
                "classes": result.classes,
            },
            overwrite=overwrite,
        )
    pairs = zip(result.tokens, result.classes, strict=True)
    description = "Object implantation of " + ", ".join(f"{t} ({c})" for t, c in pairs)
    write_card(
        files.lora,
        preferred_weight=cfg.default_lambda,
        activation_text=activation,
        description=description,
        sd_version=sd_version_label(family),
        notes=f"token embeddings: {', '.join(rel.values())}; {result.prototype_summary()}",
        overwrite=overwrite,
    )
    if preview is not None:
        write_preview(files.lora, preview, overwrite=overwrite)
    if files.bundle is not None:
        bundle_name = name + BUNDLE_INFIX
        md = metadata(bundle_name) | {"ss_output_name": bundle_name}
        tensors = lora_state_dict(modules, save_dtype) | bundle_state_dict(
            result.embeddings, family
        )
        md |= content_hashes(tensors, md)  # sshs_* and modelspec.hash_sha256
        import safetensors.torch

        atomic_write(files.bundle, safetensors.torch.save(tensors, md), overwrite=overwrite)
        write_card(
            files.bundle,
            preferred_weight=cfg.default_lambda,
            activation_text=activation,
            description=description + " (A1111: embeddings bundled in the LoRA)",
            sd_version=sd_version_label(family),
            overwrite=overwrite,
        )
    save_adapter(files.lora, modules, lora_md, overwrite=overwrite, dtype=save_dtype)
    if files.state is None:
        files.state_path.unlink(missing_ok=True)  # a stale sidecar of an earlier adapter
    if files.preview is None and overwrite:  # an earlier adapter's card picture
        files.lora.with_name(name + PREVIEW_SUFFIX).unlink(missing_ok=True)
    return files


def _relative(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # another drive on Windows
        return str(path)
