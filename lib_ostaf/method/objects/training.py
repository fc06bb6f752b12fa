"""Object implantation (Lu, Xie, Guo 2024): the inputs, the losses and the training.

The paper's three parts, by their names (our reconstruction of each: docs/method.md):

* **prototypical embedding** — :mod:`.prototype`: the new token starts from the object's
  appearance and its class (or, with no CLIP image tower, from the class word's embedding).
* **class-characterizing regularization** — :func:`prior_preservation_loss` (adapted vs
  frozen base model on the class prompt, same x_t and t; image-free) +
  :func:`anchor_loss` (each token no farther from its class word than it started).
* **object-specific loss** — :func:`object_loss`: the diffusion loss weighted by the union
  of the masks of the objects named in the step's prompt; a random subset of objects per
  step ("a photo of <o1> and <o2>").

What is trained: rank-r LoRA factors on the UNet attention
(:class:`~lib_ostaf.method.hypernet.DirectLoRA` through
:class:`~lib_ostaf.method.offsets.OffsetHooks`) plus the token vectors (own learning rate),
optionally after a first phase that trains the vectors alone. The loop is the attribute
trainer's (:func:`lib_ostaf.method.train.run_steps`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lib_ostaf.errors import IncompatibleModelError, InputError, TrainingDiverged
from lib_ostaf.files.adapter_file import LoraModule
from lib_ostaf.files.naming import UNetInfo, block_part, inspect_unet
from lib_ostaf.method.embeddings import check_new_tokens
from lib_ostaf.method.host import Host
from lib_ostaf.method.hypernet import OFFSET_NETWORKS, HypernetConfig, LayerShape
from lib_ostaf.method.images import load_image, square
from lib_ostaf.method.masks import (
    MaskSource,
    auto_masks,
    flip_mask,
    latent_weights,
    load_mask,
    square_mask,
)
from lib_ostaf.method.memory import check_options, training_options
from lib_ostaf.method.objects.prototype import (
    FALLBACK,
    PROTOTYPE,
    ClipTower,
    PrototypeInfo,
    class_word_vectors,
    prototype_target,
    prototypical_embedding,
    resolve_tower,
)
from lib_ostaf.method.offsets import OffsetHooks
from lib_ostaf.method.targets import (
    PARTS,
    Target,
    TargetSpec,
    available_blocks,
    find_module,
    select_targets,
)
from lib_ostaf.method.train import (
    Callbacks,
    check_finite_base,
    check_finite_factors,
    check_finite_probe,
    check_positive_int,
    check_shared_settings,
    detached_factors,
    factors_to_modules,
    finite,
    frozen,
    noisy_latents,
    run_steps,
)

log = logging.getLogger(__name__)


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
            check_positive_int(name, getattr(self, name))
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
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise InputError(f"parts must be a non-empty subset of {', '.join(PARTS)}")
        check_shared_settings(self.network, self.timestep_range, self.default_lambda)

    def prompt_for(self, tokens: Sequence[str]) -> str:
        return self.prompt.replace("{tokens}", " and ".join(tokens))

    def class_prompt_for(self, word: str) -> str:
        return self.class_prompt.replace("{class}", word)


def _rate(name: str, value: object, *, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0 <= value < 1) or (value == 0 and not allow_zero):  # type: ignore[operator]
        raise InputError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1), got {value!r}")


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
    masks, auto = _object_masks(reference, objects)
    info, targets, modules, layers = _lora_targets(host, config)
    scene = _scene(host, config, reference, masks, classes)
    clip = tower if tower is not None else config.clip
    prototypes, initial = _initial_embeddings(
        host, config, clip, tower_dirs, tokens, classes, class_vecs, scene
    )
    loop = _new_loop(host, config, callbacks, layers, tokens, class_vecs, initial, scene)
    losses, probe = _train(loop, modules)
    trained = {t: tuple(p.detach().float().cpu().clone() for p in loop.vectors[t]) for t in tokens}
    return ObjectResult(
        config=config,
        tokens=tokens,
        classes=classes,
        embeddings=trained,
        initial_embeddings=initial,
        network=loop.network.eval(),
        targets=targets,
        info=info,
        losses=losses,
        terms=loop.terms,
        probe=probe,
        prototypes=prototypes,
        masks=masks,
        auto_masked=auto,
        seconds=time.perf_counter() - started,
        host_meta=_host_meta(host),
    )


def _host_meta(host: Host) -> dict[str, Any]:
    """What the export needs of the host once training is over."""
    return {
        "base_model": host.base_model_name,
        "prediction_type": host.prediction_type,
        "resolution": host.resolution,
        "family": host.family,
    }


def _object_masks(
    reference: Image.Image, objects: Sequence[ObjectSpec]
) -> tuple[list[np.ndarray], list[bool]]:
    """(masks, automatic?): given (checked, resized) or automatic; at the image's own size."""
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
                log.warning("%s and %s have the same mask", objects[j].token, objects[k].token)
    return masks, auto


def _lora_targets(
    host: Host, config: ObjectConfig
) -> tuple[UNetInfo, list[Target], dict[str, torch.nn.Module], list[LayerShape]]:
    """The UNet layers the LoRA adapts: (info, targets, their modules, their shapes)."""
    info = inspect_unet(host.unet)
    targets = select_targets(host.unet, _target_spec(host, config, info), info)
    modules = {t.kohya: find_module(host.unet, t.name) for t in targets}
    layers = [
        LayerShape(t.kohya, f"{t.attn}.{t.proj}", t.in_features, t.out_features) for t in targets
    ]
    return info, targets, modules, layers


@dataclass
class _Scene:
    """The training views (reference, mirrored) with their masks, encoded once."""

    image: Image.Image  # the reference, square at the model's resolution
    masks: list[np.ndarray]  # its masks, same geometry
    latents: torch.Tensor  # [views, C, h, w] float32 CPU
    weights: torch.Tensor  # [views, objects, 1, h, w] mask weights on the latent grid
    class_conds: list[Any]  # conditioning of each object's class prompt


def _scene(
    host: Host,
    config: ObjectConfig,
    reference: Image.Image,
    masks: Sequence[np.ndarray],
    classes: Sequence[str],
) -> _Scene:
    """Views (reference, mirrored) with their masks; latents and mask weights cached."""
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
    return _Scene(sq_image, sq_masks, latents, weights, class_conds)


def _matched_tower(
    host: Host,
    clip: ClipTower | torch.nn.Module | str | Path | None,
    tower_dirs: Sequence[str | Path],
) -> tuple[ClipTower | None, int | None, str]:
    """(tower, index of the text encoder it pairs with, note); no tower when none pairs."""
    the_tower, note = resolve_tower(clip, host, tower_dirs)
    matched: int | None = None
    if the_tower is not None:
        found = the_tower.match(host.text_encoders)
        if isinstance(found, str):
            note, the_tower = f"{note} not used: {found}", None
        else:
            matched = found
    return the_tower, matched, note


def _initial_embeddings(
    host: Host,
    config: ObjectConfig,
    clip: ClipTower | torch.nn.Module | str | Path | None,
    tower_dirs: Sequence[str | Path],
    tokens: Sequence[str],
    classes: Sequence[str],
    class_vecs: Sequence[tuple[torch.Tensor, ...]],
    scene: _Scene,
) -> tuple[list[PrototypeInfo], dict[str, tuple[torch.Tensor, ...]]]:
    """Prototypical embedding (or the class word), per object: (how, initial vectors).
    The tower is dropped on return, before training."""
    the_tower, matched, note = _matched_tower(host, clip, tower_dirs)
    prototypes: list[PrototypeInfo] = []
    initial: dict[str, tuple[torch.Tensor, ...]] = {}
    torch.manual_seed(config.seed)
    for k, (token, cls) in enumerate(zip(tokens, classes, strict=True)):
        vecs = list(class_vecs[k])
        if the_tower is not None and matched is not None:
            encoder = host.text_encoders[matched]
            target = prototype_target(
                the_tower, encoder, scene.image, scene.masks[k], config.class_prompt_for(cls)
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
    return prototypes, initial


@dataclass
class _Loop:
    """What the steps of one implantation share: data, trainable parts, sampler, log."""

    host: Host
    config: ObjectConfig
    callbacks: Callbacks
    tokens: list[str]
    class_vecs: list[tuple[torch.Tensor, ...]]
    scene: _Scene
    network: torch.nn.Module  # the LoRA factors
    vectors: dict[str, list[torch.nn.Parameter]]  # the token vectors, per text encoder
    margins: list[list[float]]  # each token's starting distance from its class word
    t_lo: int
    t_hi: int
    generator: torch.Generator  # draws of the steps: view, objects, t, noise
    terms: dict[str, list[float]] = field(
        default_factory=lambda: {"object": [], "prior": [], "anchor": []}
    )
    lora: bool = False  # the second phase: LoRA factors on
    hooks: OffsetHooks = field(init=False, repr=False)  # set once the hooks are on the UNet

    @property
    def token_params(self) -> list[torch.nn.Parameter]:
        return [p for t in self.tokens for p in self.vectors[t]]

    def embeddings_of(self, members: Sequence[int]) -> dict[str, list[torch.nn.Parameter]]:
        return {self.tokens[k]: self.vectors[self.tokens[k]] for k in members}

    def step_loss(self, step: int) -> torch.Tensor:
        """One step: a random view, subset of objects, t and noise; the object loss plus the
        class-characterizing regularization."""
        host, config, latents, g = self.host, self.config, self.scene.latents, self.generator
        i = int(torch.randint(latents.shape[0], (1,), generator=g))
        members = _subset(len(self.tokens), g)
        t = torch.randint(self.t_lo, self.t_hi + 1, (1,), generator=g)
        noise = torch.randn(latents[i : i + 1].shape, generator=g)
        self.hooks.factors = self.network() if self.lora else {}
        cond = host.encode_prompt(
            config.prompt_for([self.tokens[k] for k in members]), self.embeddings_of(members)
        )
        x_t, target = noisy_latents(
            latents[i : i + 1], noise, t, host.alphas_cumprod, host.prediction_type
        )
        x_t = x_t.to(host.device, host.dtype)
        pred = host.predict_noise(x_t, t.to(host.device), cond)
        union = self.scene.weights[i, members].amax(0)[None]
        w = union + config.background_weight * (1 - union)
        loss = object_loss(pred, target.to(pred.device), w)
        prior, anchor = self._regularization(members[0], x_t, t, loss.new_zeros(()))
        self.terms["object"].append(float(loss.detach()))
        self.terms["prior"].append(float(prior.detach()))
        self.terms["anchor"].append(float(anchor.detach()))
        return loss + config.class_weight * (prior + config.anchor_weight * anchor)

    def _regularization(
        self, k: int, x_t: torch.Tensor, t: torch.Tensor, zero: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prior, anchor) for object ``k``: the prior only with the LoRA on (before, the
        adapted model is the base one), the anchor whenever weighted; ``zero`` otherwise."""
        config, prior, anchor = self.config, zero, zero
        if config.class_weight > 0:
            vectors = self.vectors[self.tokens[k]]
            class_vecs, margins = self.class_vecs[k], self.margins[k]
            if self.lora:
                prior, anchor = class_regularization(
                    self.host, self.hooks, x_t, t.to(self.host.device), self.scene.class_conds[k],
                    vectors, class_vecs, config.anchor_weight, margins,
                )  # fmt: skip
            elif config.anchor_weight:
                anchor = anchor_loss(vectors, class_vecs, margins)
        return prior, anchor

    def before_preview(self) -> None:
        self.hooks.factors = self.network() if self.lora else {}
        self.callbacks.preview_embeddings = {
            t: tuple(v.detach().float().cpu() for v in self.vectors[t]) for t in self.tokens
        }

    def probe(self, factors: Any, sets: dict[str, _ProbeSet]) -> dict[str, float]:
        s = self.scene
        return _probe(
            self.host, self.hooks, factors, sets, s.latents, s.weights, self.tokens,
            self.vectors, self.config,
        )  # fmt: skip


def _new_loop(
    host: Host,
    config: ObjectConfig,
    callbacks: Callbacks,
    layers: list[LayerShape],
    tokens: list[str],
    class_vecs: list[tuple[torch.Tensor, ...]],
    initial: dict[str, tuple[torch.Tensor, ...]],
    scene: _Scene,
) -> _Loop:
    """Trainable parts (LoRA factors, token vectors from ``initial``) and the step sampler."""
    torch.manual_seed(config.seed)
    net_cfg = HypernetConfig(rank=config.rank)
    network = OFFSET_NETWORKS[config.network](layers, net_cfg).to(host.device)
    vectors = {
        t: [torch.nn.Parameter(v.clone().to(host.device)) for v in initial[t]] for t in tokens
    }
    margins = [
        [float(relative_distance(v, c)) for v, c in zip(initial[t], class_vecs[k], strict=True)]
        for k, t in enumerate(tokens)
    ]
    for t in tokens:
        for p in vectors[t]:
            p.requires_grad_(config.embedding_lr > 0)
    n_train = len(host.alphas_cumprod)
    t_lo, t_hi = (round(f * (n_train - 1)) for f in config.timestep_range)
    generator = torch.Generator().manual_seed(config.seed)
    return _Loop(
        host, config, callbacks, tokens, class_vecs, scene, network, vectors, margins,
        t_lo, t_hi, generator,
    )  # fmt: skip


def _train(
    loop: _Loop, modules: dict[str, torch.nn.Module]
) -> tuple[list[float], dict[str, tuple[float, float]]]:
    """Both phases with the hooks on and the model frozen: (losses, probe before/after).
    Raises before returning anything not finite; the optimizers' state is freed."""
    host, config, token_params = loop.host, loop.config, loop.token_params
    probe_sets = _probe_sets(loop.tokens, loop.scene.latents.shape[0], config, loop.t_lo, loop.t_hi)
    optimizers: list[torch.optim.Optimizer] = []
    encoders = [getattr(e, "model", None) for e in host.text_encoders]
    try:
        with (
            frozen(host.unet, *[m for m in encoders if m is not None]),
            OffsetHooks(modules) as hooks,
        ):
            loop.hooks = hooks
            before = loop.probe({}, probe_sets)
            check_finite_base(before.values())
            losses = _run_phases(loop, token_params, optimizers)
            with torch.no_grad():
                factors = loop.network()
            check_finite_factors(factors)
            if not finite(*token_params):
                raise TrainingDiverged(
                    "training diverged: the token vectors are not finite; lower the token "
                    "learning rate. Nothing was written."
                )
            after = loop.probe(factors, probe_sets)
            check_finite_probe(after.values())
    finally:
        for opt in optimizers:
            opt.state.clear()
        loop.callbacks.preview_embeddings = None
    return losses, {label: (before[label], after[label]) for label in before}


def _run_phases(
    loop: _Loop, token_params: list[torch.nn.Parameter], optimizers: list[torch.optim.Optimizer]
) -> list[float]:
    """The token vectors alone (``embedding_steps``), then LoRA + vectors (``steps``); each
    phase's optimizer goes into ``optimizers`` (for the caller to free)."""
    host, config, callbacks = loop.host, loop.config, loop.callbacks
    first_phase = config.embedding_steps if config.embedding_lr > 0 else 0
    total = first_phase + config.steps
    losses: list[float] = []
    options = training_options(
        host.unet, host.device, host.family, config.precision,
        config.gradient_checkpointing, compute_dtype=host.dtype,
    )  # fmt: skip
    with options as precision:
        if first_phase:
            opt = torch.optim.AdamW(token_params, lr=config.embedding_lr, weight_decay=0.0)
            optimizers.append(opt)
            losses += run_steps(
                first_phase, loop.step_loss, opt, callbacks,
                preview_every=config.preview_every, before_preview=loop.before_preview,
                total=total, precision=precision,
            )  # fmt: skip
        loop.lora = True
        groups = [{"params": list(loop.network.parameters()), "lr": config.lr}]
        if config.embedding_lr > 0:
            groups.append({"params": token_params, "lr": config.embedding_lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        optimizers.append(opt)
        losses += run_steps(
            config.steps, loop.step_loss, opt, callbacks,
            preview_every=config.preview_every, before_preview=loop.before_preview,
            first=total - config.steps, total=total, precision=precision,
        )  # fmt: skip
    return losses


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
