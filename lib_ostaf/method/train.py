"""One-shot attribute tuning (OSTAF): the training loop and the export of its result.

``train_attribute(host, image, config)`` learns a hypernetwork whose offsets, added to the
attention layers of the encoder (shape) or decoder (appearance, style), make the frozen
model reproduce the reference for the placeholder prompt. ``export`` writes the kohya
LoRA file, the hypernetwork state and the WebUI card sidecars.

The step loop itself (:func:`run_steps`, :func:`frozen`) is shared with object
implantation (:func:`lib_ostaf.method.objects.train_objects`): one loop, two step functions.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from lib_ostaf import __version__
from lib_ostaf.errors import InputError, Interrupted, ModelNotFinite, TrainingDiverged
from lib_ostaf.files.adapter_file import LoraModule, save_adapter
from lib_ostaf.files.adapter_file import save_state as write_state
from lib_ostaf.files.filenames import PREVIEW_SUFFIX, STATE_SUFFIX, validate_name
from lib_ostaf.files.metadata import build_metadata, sd_version_label
from lib_ostaf.files.naming import UNetInfo, inspect_unet
from lib_ostaf.files.sidecars import write_card, write_preview
from lib_ostaf.method.augment import ATTRIBUTES, make_views
from lib_ostaf.method.embeddings import (
    EMBEDDING_SUFFIX,
    EMBEDDINGS_FOLDER,
    Embeddings,
    check_new_tokens,
    file_stem,
    placeholder_at,
    save_embedding,
)
from lib_ostaf.method.host import Host
from lib_ostaf.method.hypernet import OFFSET_NETWORKS, HypernetConfig, LayerShape
from lib_ostaf.method.images import load_image, square
from lib_ostaf.method.masks import MaskSource, load_mask, square_mask
from lib_ostaf.method.memory import (
    NO_PRECISION,
    Precision,
    ZeroGradients,
    check_options,
    training_options,
)
from lib_ostaf.method.offsets import OffsetHooks, check_lambda
from lib_ostaf.method.parts import PART_SEPARATOR, attribute_parts, parts_table
from lib_ostaf.method.targets import Target, TargetSpec, find_module, select_targets

# "{token}" is replaced by the placeholder word. Reasons in docs/method.md.
DEFAULT_PROMPTS = {
    "shape": "a photo of a {token} shaped object",
    "appearance": "a photo of a {token} textured object",
    "style": "a painting in {token} style",
    # two parts: each trains on its own prompt above; this one is for previews and cards
    "shape+appearance": "a photo of a {token} object",
    "shape+style": "a painting of a {token} object",
}
# Appearance and style are fine detail: trained on the less noisy half of the schedule,
# where that detail is decided (measured on tiny-world, docs/results.md).
ATTRIBUTE_TIMESTEPS = {"shape": (0.0, 1.0), "appearance": (0.0, 0.5), "style": (0.0, 0.5)}
# Appearance and style also learn the placeholder's own vector (a textual-inversion token,
# scaled by λ at generation); shape does not (measured on tiny-world, docs/results.md).
ATTRIBUTE_TOKEN_LR = {"shape": 0.0, "appearance": 5e-3, "style": 5e-3}
# The offsets' learning rate: with the learned placeholder carrying the colour, appearance
# needs a gentler rate than shape (measured on tiny-world, docs/results.md).
ATTRIBUTE_LR = {"shape": 3e-3, "appearance": 1e-3, "style": 1e-3}
TOKEN_INIT = "object"  # the word the placeholder vector starts from (λ = 0 gives it back)
# A later part of a two-part file trains on the first part's token at these λ (its dial's range)
SPLICE_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Two attributes of one image in one file: parts on disjoint blocks, each with its own views,
# prompt and rates; the token-learning part first, as alone; the other on its learned token
# (docs/method.md "Both parts from one image").
COMBINED = ("shape+appearance", "shape+style")
ATTRIBUTE_CHOICES = (*ATTRIBUTES, *COMBINED)
TOKEN_PATTERN = re.compile(r"^[^\s<>:,()\[\]{}|\\]{1,40}$")


@dataclass(frozen=True)
class AttributeConfig:
    """Settings of one OSTAF run. ``None`` fields take the attribute's default from the
    tables above (measured on tiny-world; not yet tried on a real checkpoint; style follows
    appearance unmeasured). Reasons in docs/method.md."""

    attribute: str = "appearance"
    token: str = "ostafv"
    prompt: str = ""  # "" → DEFAULT_PROMPTS[attribute]; must contain "{token}"
    steps: int = 400
    rank: int = 4
    lr: float | None = None  # None = the attribute's (ATTRIBUTE_LR)
    seed: int = 0
    network: str = "hypernet"  # "lora" = the ablation: tune factors directly
    code_dim: int = 32
    hidden: int = 128
    n_views: int = 8
    # fraction of the schedule sampled; None = the attribute's (ATTRIBUTE_TIMESTEPS)
    timestep_range: tuple[float, float] | None = None
    caption_dropout: float = 0.0  # fraction of steps on the empty prompt (docs/method.md)
    # learning rate of the placeholder's own vector (0 = none); None = ATTRIBUTE_TOKEN_LR
    token_lr: float | None = None
    include_mid: bool = False
    attn: tuple[str, ...] = ("attn1", "attn2")
    proj: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    blocks: tuple[str, ...] | None = None  # expert override: explicit diffusers block ids
    default_lambda: float = 1.0
    preview_every: int = 0  # 0 = no previews
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (lib_ostaf.method.memory)
    gradient_checkpointing: str = "auto"  # auto | on | off

    def __post_init__(self) -> None:
        check_options(self.precision, self.gradient_checkpointing)
        if self.attribute not in ATTRIBUTE_CHOICES:
            choices = ", ".join(ATTRIBUTE_CHOICES)
            raise InputError(f"unknown attribute {self.attribute!r}; choose one of {choices}")
        if self.combined:
            if self.blocks:
                raise InputError("blocks cannot be given for two parts at once; train them apart")
            self.part_configs()  # each part validates itself
            return
        check_positive_int("steps", self.steps)
        check_positive_int("rank", self.rank)
        check_positive_int("n_views", self.n_views)
        if not isinstance(self.lr_, (int, float)) or not 0 < self.lr_ < 1:
            raise InputError(f"learning rate must be in (0, 1), got {self.lr!r}")
        if not TOKEN_PATTERN.match(self.token):
            raise InputError(
                f"placeholder token {self.token!r} must be one word without spaces or <>:,()[]{{}}|"
            )
        if self.prompt and "{token}" not in self.prompt:
            raise InputError("the training prompt must contain {token}")
        check_shared_settings(self.network, self.timesteps, self.default_lambda)
        if not isinstance(self.token_lr_, (int, float)) or not 0 <= self.token_lr_ < 1:
            raise InputError(f"token_lr must be in [0, 1), got {self.token_lr!r}")
        if not isinstance(self.caption_dropout, (int, float)) or not 0 <= self.caption_dropout < 1:
            raise InputError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")

    @property
    def combined(self) -> bool:
        """Two attributes (``shape+appearance``): one part each, in one file."""
        return PART_SEPARATOR in self.attribute

    @property
    def parts(self) -> tuple[str, ...]:
        return attribute_parts(self.attribute)

    def part_configs(self) -> list[AttributeConfig]:
        """One config per part, the token-learning part (appearance/style) first; each
        takes its attribute's defaults for the fields left ``None``."""
        if not self.combined:
            return [self]
        order = sorted(self.parts, key=lambda a: ATTRIBUTE_TOKEN_LR[a] == 0)
        return [replace(self, attribute=a) for a in order]

    @property
    def timesteps(self) -> tuple[float, float]:
        """The sampled fraction of the noise schedule (the attribute's default if unset)."""
        return tuple(self.timestep_range or ATTRIBUTE_TIMESTEPS[self.attribute])  # type: ignore[return-value]

    @property
    def lr_(self) -> float:
        """The offsets' learning rate (the attribute's default if unset)."""
        return ATTRIBUTE_LR[self.attribute] if self.lr is None else self.lr

    @property
    def token_lr_(self) -> float:
        """The placeholder vector's learning rate (the attribute's default if unset)."""
        return ATTRIBUTE_TOKEN_LR[self.attribute] if self.token_lr is None else self.token_lr

    @property
    def training_prompt(self) -> str:
        return (self.prompt or DEFAULT_PROMPTS[self.attribute]).replace("{token}", self.token)

    def target_spec(self) -> TargetSpec:
        return TargetSpec(
            attribute=self.attribute,
            include_mid=self.include_mid,
            attn=tuple(self.attn),
            proj=tuple(self.proj),
            blocks=tuple(self.blocks) if self.blocks else None,
        )


def check_shared_settings(
    network: str, timesteps: tuple[float, float], default_lambda: float
) -> None:
    """What both methods' configs check alike: the offset network, the sampled timestep
    fractions (0 ≤ lo < hi ≤ 1) and the preferred λ."""
    if network not in OFFSET_NETWORKS:
        raise InputError(f"network must be one of {', '.join(OFFSET_NETWORKS)}")
    lo, hi = timesteps
    if not 0.0 <= lo < hi <= 1.0:
        raise InputError(f"timestep_range must satisfy 0 ≤ lo < hi ≤ 1, got {timesteps}")
    check_lambda(default_lambda)


def check_positive_int(name: str, value: object) -> None:
    """InputError unless ``value`` is an int > 0 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class Callbacks:
    """Hooks for a UI: progress after each step, previews, and interruption."""

    progress: Callable[[int, int, float], None] | None = None  # (step, total, loss)
    preview: Callable[[int], None] | None = None  # called with offsets active at λ=1
    should_stop: Callable[[], bool] | None = None
    # Object implantation sets this to the tokens' current vectors before each preview.
    preview_embeddings: dict[str, tuple[torch.Tensor, ...]] | None = None


@dataclass
class TrainResult:
    config: AttributeConfig
    network: torch.nn.Module
    targets: list[Target]
    info: UNetInfo
    losses: list[float]
    probe_loss_before: float
    probe_loss_after: float
    seconds: float
    host_meta: dict[str, Any] = field(default_factory=dict)
    # the placeholder's learned vectors (one per text encoder) and where they started
    embeddings: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    token_init: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)  # kohya key → attribute (ostaf.parts)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return detached_factors(self.network)

    def lora_modules(self) -> dict[str, LoraModule]:
        """The exact ΔW = B·A of every layer as kohya modules (alpha = rank → scale 1)."""
        return factors_to_modules(self.factors())


def detached_factors(network: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The network's current factors ``{key: (A, B)}`` as float32 CPU tensors, no graph."""
    with torch.no_grad():
        return {
            k: (a.detach().float().cpu(), b.detach().float().cpu())
            for k, (a, b) in network().items()
        }


def factors_to_modules(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, LoraModule]:
    """Factors ``{key: (A, B)}`` as kohya modules with alpha = rank (ΔW = B·A exactly)."""
    return {
        key: LoraModule(down=a.contiguous(), up=b.contiguous(), alpha=float(a.shape[0]))
        for key, (a, b) in factors.items()
    }


class _Probe:
    """A fixed set of (view, t, noise) to measure the loss before/after training."""

    def __init__(self, latents: torch.Tensor, steps: Sequence[int], seed: int) -> None:
        g = torch.Generator().manual_seed(seed + 1)
        n = len(steps)
        self.x0 = latents[torch.arange(n) % latents.shape[0]]
        self.t = torch.tensor(list(steps), dtype=torch.long)
        self.noise = torch.randn(self.x0.shape, generator=g)


def noisy_latents(x0, noise, t, alphas_cumprod, prediction_type):
    """``(x_t, target)``: the forward process at ``t`` and the model's regression target
    (ε, or v = √ᾱ ε − √(1−ᾱ) x₀ for v-prediction)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.device, torch.float32)
    x_t = a.sqrt() * x0.float() + (1 - a).sqrt() * noise
    if prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * x0.float()
    elif prediction_type == "epsilon":
        target = noise
    else:
        raise InputError(f"unsupported prediction type {prediction_type!r}")
    return x_t, target


_noisy = noisy_latents


def diffusion_loss(host: Host, x0, noise, t, cond) -> torch.Tensor:
    """``‖target − model(x_t, t, c)‖²`` with target ε or v, as the host's model predicts."""
    x_t, target = _noisy(x0, noise, t, host.alphas_cumprod, host.prediction_type)
    pred = host.predict_noise(x_t.to(host.device, host.dtype), t.to(host.device), cond)
    return F.mse_loss(pred.float(), target.to(pred.device))


@contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Base model frozen for training: eval mode, no gradients; both restored afterwards."""
    saved = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    for m in modules:
        m.eval().requires_grad_(False)
    try:
        yield
    finally:
        for m, was_training, flags in saved:
            for p, flag in zip(m.parameters(), flags, strict=True):
                p.requires_grad_(flag)
            m.train(was_training)


log = logging.getLogger(__name__)
MAX_SKIPPED = 3  # non-finite steps tolerated (or a tenth of the steps, if more)


def finite(*tensors: torch.Tensor) -> bool:
    """Whether every value of every tensor is finite (one sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def check_finite_factors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """TrainingDiverged if a trained offset is not finite (never written to a file)."""
    if not finite(*(t for pair in factors.values() for t in pair)):
        raise TrainingDiverged(
            "training diverged: the learned offsets are not finite; lower the learning rate. "
            "Nothing was written."
        )


def check_finite_base(losses: Iterable[float]) -> None:
    """ModelNotFinite if the model, before any training, already predicts non-finite values
    on the reference: then no learning rate helps, and training would only end "diverged"."""
    if not all(math.isfinite(x) for x in losses):
        raise ModelNotFinite(
            "the loaded model's prediction is not finite on this reference at some noise "
            "levels, before any training (the model or its VAE overflows in its precision; "
            "try another checkpoint or VAE, or full precision). Nothing was trained or written."
        )


def check_finite_cond(cond: Any, *, learned: bool) -> None:
    """The training prompt's conditioning must be finite; if not, name the text side (the
    UNet and the offsets are not at fault). ``learned``: it carries the learned token."""
    values = cond.values() if isinstance(cond, dict) else [cond]
    if finite(*(v for v in values if torch.is_tensor(v))):
        return
    if learned:
        raise TrainingDiverged(
            "training diverged: the text encoder's output for the prompt with the learned "
            "token is not finite; lower token_lr (0 keeps the start word). Nothing was written."
        )
    raise ModelNotFinite(
        "the text encoder's output for the training prompt is not finite, before any "
        "training (the text encoder overflows in its precision, or the WebUI's emphasis "
        "setting divides by a zero mean); try another checkpoint, full precision or "
        "emphasis 'None'. Nothing was trained or written."
    )


def check_finite_probe(losses: Iterable[float]) -> None:
    """TrainingDiverged if the trained adapter makes the model's prediction non-finite."""
    if not all(math.isfinite(x) for x in losses):
        raise TrainingDiverged(
            "training diverged: with the learned offsets the model's prediction is not finite "
            "at some noise levels; lower the learning rate(s). Nothing was written."
        )


def run_steps(
    steps: int,
    step_loss: Callable[[int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    callbacks: Callbacks,
    *,
    preview_every: int = 0,
    before_preview: Callable[[], None] | None = None,
    first: int = 0,
    total: int | None = None,
    precision: Precision = NO_PRECISION,
) -> list[float]:
    """The one training loop of both methods: ``steps`` optimizer steps of ``step_loss``.

    ``step_loss(step)`` samples and returns the step's loss (it sets any offsets itself).
    Progress is reported as ``first + step + 1`` of ``total`` (phases share one count);
    ``should_stop`` is checked before every step, previews run every ``preview_every``.
    A step whose loss or gradients are not finite is skipped (like a loss scaler would);
    more than :data:`MAX_SKIPPED` of them stop the run with :class:`TrainingDiverged`, and
    so do all-zero gradients (:class:`~lib_ostaf.method.memory.ZeroGradients`).
    """
    total = first + steps if total is None else total
    losses: list[float] = []
    skipped = 0
    zeros = ZeroGradients(steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for step in range(steps):
        done = first + step
        if callbacks.should_stop and callbacks.should_stop():
            raise Interrupted(f"training interrupted at step {done}/{total}")
        with precision.autocast():
            loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss, optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if finite(loss, *grads):
            precision.step(optimizer, zero=zeros.check(grads, done + 1))
        elif not precision.skip(loss):  # True: the loss scale was too high and falls
            skipped += 1
            log.warning("step %d: non-finite loss or gradients; step skipped", done + 1)
            if skipped > max(MAX_SKIPPED, steps // 10):
                raise TrainingDiverged(
                    f"training diverged: {skipped} steps with non-finite loss or gradients "
                    f"by step {done + 1}; lower the learning rate. Nothing was written."
                )
        losses.append(float(loss.detach()))
        if callbacks.progress:
            callbacks.progress(done + 1, total, losses[-1])
        if callbacks.preview and preview_every and (done + 1) % preview_every == 0:
            with torch.no_grad():
                if before_preview:
                    before_preview()
                callbacks.preview(done + 1)
    return losses


def train_attribute(
    host: Host,
    image: Image.Image | str | Path,
    config: AttributeConfig,
    callbacks: Callbacks | None = None,
    *,
    mask: MaskSource | None = None,
) -> TrainResult:
    """Train an OSTAF adapter on one reference image. The host's model is left as found.

    ``mask`` marks the reference's object (None: found automatically); the views vary
    everything outside the attribute around it (:mod:`lib_ostaf.method.augment`). A combined
    attribute (``shape+appearance``) trains its parts one after the other, ``config.steps``
    steps each: the token-learning part exactly as alone, the other on its learned token
    (:data:`SPLICE_LAMBDAS`); and returns them as one result.
    """
    callbacks = callbacks or Callbacks()
    parts = config.part_configs()
    total = config.steps * len(parts)
    results: list[TrainResult] = []
    for i, part in enumerate(parts):
        # a later part meets the first part's learned token at generation: train it so
        spliced = (results[0].embeddings, results[0].token_init) if results else None
        results.append(
            _train_part(
                host,
                image,
                part,
                callbacks,
                mask=mask,
                first=i * config.steps,
                total=total,
                spliced=spliced,
            )
        )
    return results[0] if len(results) == 1 else combine_parts(config, results)


@dataclass
class _PartSetup:
    """What one part trains with, built once before its first step (:func:`_set_up_part`)."""

    targets: list[Target]
    info: UNetInfo
    modules: dict[str, torch.nn.Module]  # kohya key → the target layer
    network: torch.nn.Module  # the offset network (hypernetwork, or LoRA factors)
    latents: torch.Tensor  # the views' latents (float32, CPU)
    empty: Any  # the empty prompt's conditioning (caption dropout), or None
    token: Placeholder
    cond: Any  # the prompt's conditioning for the probe before training
    t_range: tuple[int, int]  # the sampled timesteps, both ends included
    probe: _Probe


def _train_part(
    host: Host,
    image: Image.Image | str | Path,
    config: AttributeConfig,
    callbacks: Callbacks,
    *,
    mask: MaskSource | None,
    first: int,
    total: int,
    spliced: tuple[Embeddings, Embeddings] | None = None,
) -> TrainResult:
    """One attribute's training (progress counted from ``first`` of ``total``);
    ``spliced`` = (learned, start) token vectors of an earlier part (see :class:`Placeholder`)."""
    started = time.perf_counter()
    part = _set_up_part(host, image, config, mask, spliced)
    losses, before, after = _fit_part(host, config, part, callbacks, first=first, total=total)
    return TrainResult(
        config=config,
        network=part.network.eval(),
        targets=part.targets,
        info=part.info,
        losses=losses,
        probe_loss_before=before,
        probe_loss_after=after,
        seconds=time.perf_counter() - started,
        host_meta={
            "base_model": host.base_model_name,
            "prediction_type": host.prediction_type,
            "resolution": host.resolution,
        },
        embeddings=part.token.current(),
        token_init=part.token.init(),
        parts=dict.fromkeys((t.kohya for t in part.targets), config.attribute),
    )


def _set_up_part(
    host: Host,
    image: Image.Image | str | Path,
    config: AttributeConfig,
    mask: MaskSource | None,
    spliced: tuple[Embeddings, Embeddings] | None,
) -> _PartSetup:
    """The part's targets, offset network, cached views and prompt, and probe."""
    reference = load_image(image)
    info = inspect_unet(host.unet)
    targets = select_targets(host.unet, config.target_spec(), info)
    modules = {t.kohya: find_module(host.unet, t.name) for t in targets}
    network = _offset_network(host, config, targets)
    # Cache: the views' latents and the prompt's conditioning are computed once.
    latents = _view_latents(host, reference, config, mask)
    with torch.no_grad():
        empty = host.encode_prompt("") if config.caption_dropout > 0 else None
    token = Placeholder(host, config, spliced)
    with torch.no_grad():
        cond = token.cond(probe=True)  # for the probe before training
    t_lo, t_hi = _timestep_range(host, config)
    probe = _Probe(latents, torch.linspace(t_lo, t_hi, 16).round().long().tolist(), config.seed)
    return _PartSetup(
        targets=targets,
        info=info,
        modules=modules,
        network=network,
        latents=latents,
        empty=empty,
        token=token,
        cond=cond,
        t_range=(t_lo, t_hi),
        probe=probe,
    )


def _offset_network(
    host: Host, config: AttributeConfig, targets: Sequence[Target]
) -> torch.nn.Module:
    """The offset network over ``targets`` (hypernetwork, or LoRA factors for the ablation),
    initialised after seeding the global RNG with ``config.seed``."""
    layers = [
        LayerShape(t.kohya, f"{t.attn}.{t.proj}", t.in_features, t.out_features) for t in targets
    ]

    torch.manual_seed(config.seed)
    net_cfg = HypernetConfig(rank=config.rank, code_dim=config.code_dim, hidden=config.hidden)
    return OFFSET_NETWORKS[config.network](layers, net_cfg).to(host.device)


def _view_latents(
    host: Host, reference: Image.Image, config: AttributeConfig, mask: MaskSource | None
) -> torch.Tensor:
    """The latents (float32, CPU) of the reference's views (:func:`make_views`), which vary
    everything outside the attribute around the object (``mask``)."""
    ref = square(reference, host.resolution)
    with torch.no_grad():
        cell = max(1, host.resolution // host.encode_image(ref).shape[-1])
        views = make_views(
            ref,
            config.attribute,
            config.n_views,
            config.seed,
            mask=None if mask is None else square_mask(load_mask(mask, reference.size), ref.width),
            cell=cell,
        )
        return torch.cat([host.encode_image(v) for v in views]).float().cpu()


def _timestep_range(host: Host, config: AttributeConfig) -> tuple[int, int]:
    """The sampled timesteps ``(lo, hi)``, both included: ``config.timesteps`` of the
    host's training schedule."""
    n_train = len(host.alphas_cumprod)
    t_lo, t_hi = (round(f * (n_train - 1)) for f in config.timesteps)
    return t_lo, t_hi


def _optimizer(
    network: torch.nn.Module, token: Placeholder, config: AttributeConfig
) -> torch.optim.AdamW:
    """AdamW over the offsets and, if the placeholder learns its vector, that vector."""
    groups = [{"params": list(network.parameters()), "lr": config.lr_}]
    if token.vectors:
        groups.append({"params": token.vectors, "lr": config.token_lr_})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def _fit_part(
    host: Host,
    config: AttributeConfig,
    part: _PartSetup,
    callbacks: Callbacks,
    *,
    first: int,
    total: int,
) -> tuple[list[float], float, float]:
    """The part's training steps on the frozen model: ``(losses, probe before, probe
    after)``, every loss and the learned offsets and token checked finite."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _optimizer(part.network, part.token, config)
    options = training_options(
        host.unet,
        host.device,
        host.family,
        config.precision,
        config.gradient_checkpointing,
        compute_dtype=host.dtype,
    )
    try:
        with frozen(host.unet, *part.token.encoders), OffsetHooks(part.modules) as hooks:
            step_loss = _step_loss(host, config, part, hooks, generator)

            def set_factors() -> None:
                hooks.factors = part.network()
                callbacks.preview_embeddings = part.token.current() or None

            check_finite_cond(part.cond, learned=False)
            before = _probe_loss(host, part.network, hooks, part.probe, part.cond)
            check_finite_base([before])
            with options as precision:
                losses = run_steps(
                    config.steps,
                    step_loss,
                    optimizer,
                    callbacks,
                    preview_every=config.preview_every,
                    before_preview=set_factors,
                    first=first,
                    total=total,
                    precision=precision,
                )
            after = _probe_after_training(host, part, hooks)
    finally:
        optimizer.state.clear()
        callbacks.preview_embeddings = None
    return losses, before, after


def _step_loss(
    host: Host,
    config: AttributeConfig,
    part: _PartSetup,
    hooks: OffsetHooks,
    generator: torch.Generator,
) -> Callable[[int], torch.Tensor]:
    """The step function of :func:`run_steps`: the diffusion loss of a random view,
    timestep and noise (drawn from ``generator`` in that order, then the caption-dropout
    draw), with the offsets at their current values."""
    latents, empty, token = part.latents, part.empty, part.token
    t_lo, t_hi = part.t_range

    def step_loss(step: int) -> torch.Tensor:
        i = int(torch.randint(latents.shape[0], (1,), generator=generator))
        t = torch.randint(t_lo, t_hi + 1, (1,), generator=generator)
        noise = torch.randn(latents[i : i + 1].shape, generator=generator)
        drop = config.caption_dropout > 0 and (
            float(torch.rand((), generator=generator)) < config.caption_dropout
        )
        hooks.factors = part.network()
        return diffusion_loss(
            host,
            latents[i : i + 1].to(host.device),
            noise.to(host.device),
            t,
            empty if drop else token.cond(),
        )

    return step_loss


def _probe_after_training(host: Host, part: _PartSetup, hooks: OffsetHooks) -> float:
    """The probe loss with the learned offsets and token, each checked finite first
    (:class:`TrainingDiverged` names what diverged)."""
    with torch.no_grad():
        check_finite_factors(part.network())
        if not finite(*part.token.vectors):
            raise TrainingDiverged(
                "training diverged: the learned token vector is not finite; lower "
                "token_lr. Nothing was written."
            )
        cond = part.token.cond(probe=True)
    check_finite_cond(cond, learned=bool(part.token.vectors))
    after = _probe_loss(host, part.network, hooks, part.probe, cond)
    check_finite_probe([after])
    return after


class PartNetworks(torch.nn.Module):
    """The parts' offset networks side by side (disjoint layers): one network to export."""

    def __init__(self, networks: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleDict(networks)
        first = next(iter(networks.values()))
        self.config = first.config
        self.layers = [layer for n in networks.values() for layer in n.layers]

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {k: f for n in self.parts.values() for k, f in n().items()}


def combine_parts(config: AttributeConfig, results: Sequence[TrainResult]) -> TrainResult:
    """The parts' results as one (their layers must not overlap)."""
    keys = [t.kohya for r in results for t in r.targets]
    if len(set(keys)) != len(keys):
        raise InputError("the parts' blocks overlap; train them as separate adapters")
    n = len(results)
    return TrainResult(
        config=config,
        network=PartNetworks({r.config.attribute: r.network for r in results}).eval(),
        targets=[t for r in results for t in r.targets],
        info=results[0].info,
        losses=[x for r in results for x in r.losses],
        probe_loss_before=sum(r.probe_loss_before for r in results) / n,
        probe_loss_after=sum(r.probe_loss_after for r in results) / n,
        seconds=sum(r.seconds for r in results),
        host_meta=results[0].host_meta,
        embeddings={k: v for r in results for k, v in r.embeddings.items()},
        token_init={k: v for r in results for k, v in r.token_init.items()},
        parts={k: p for r in results for k, p in r.parts.items()},
    )


class Placeholder:
    """The placeholder word's conditioning: fixed text, or a learned vector per text encoder.

    With ``token_lr > 0`` the word gets its own input-embedding vector, started from
    :data:`TOKEN_INIT` (textual inversion, trained jointly with the offsets); the prompt is
    then encoded each step, with gradients to the vector only.

    ``spliced`` = (learned, start) vectors of the file's other part: at generation this part
    meets the word as ``start + λ·(learned − start)``, λ following the other part's dial, so
    each step draws λ from :data:`SPLICE_LAMBDAS` (docs/method.md, "Both parts").
    """

    def __init__(
        self,
        host: Host,
        config: AttributeConfig,
        spliced: tuple[Embeddings, Embeddings] | None = None,
    ) -> None:
        self.host, self.config = host, config
        self.vectors: list[torch.nn.Parameter] = []
        self.encoders: list[torch.nn.Module] = []
        self._start: tuple[torch.Tensor, ...] = ()
        self._spliced: list[dict[str, Any]] = []
        if spliced and spliced[0]:
            learned, start = spliced
            with torch.no_grad():
                self._spliced = [
                    host.encode_prompt(config.training_prompt, placeholder_at(learned, start, lam))
                    for lam in SPLICE_LAMBDAS
                ]
            self._draw = torch.Generator().manual_seed(config.seed)
            return
        encoders = list(getattr(host, "text_encoders", None) or [])
        if config.token_lr_ > 0 and not encoders:
            log.warning("this host cannot learn a token vector; training the offsets only")
        if config.token_lr_ <= 0 or not encoders:
            with torch.no_grad():
                self._fixed = host.encode_prompt(config.training_prompt)
            return
        check_new_tokens([config.token], encoders)
        self._start = tuple(e.word_vectors(TOKEN_INIT).mean(0, keepdim=True) for e in encoders)
        self.vectors = [torch.nn.Parameter(v.clone().to(host.device)) for v in self._start]
        self.encoders = [m for e in encoders if (m := getattr(e, "model", None)) is not None]

    def cond(self, probe: bool = False) -> dict[str, Any]:
        """The prompt's conditioning for one step (``probe``: the fixed one, λ = 1)."""
        if self._spliced:
            if probe:
                return self._spliced[-1]
            i = int(torch.randint(len(self._spliced), (1,), generator=self._draw))
            return self._spliced[i]
        if not self.vectors:
            return self._fixed
        return self.host.encode_prompt(
            self.config.training_prompt, {self.config.token: self.vectors}
        )

    def current(self) -> dict[str, tuple[torch.Tensor, ...]]:
        if not self.vectors:
            return {}
        return {self.config.token: tuple(v.detach().float().cpu() for v in self.vectors)}

    def init(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {self.config.token: self._start} if self.vectors else {}


@torch.no_grad()
def _probe_loss(host: Host, network, hooks: OffsetHooks, probe: _Probe, cond) -> float:
    hooks.factors = network()
    total = 0.0
    for j in range(len(probe.t)):
        x0, noise, t = probe.x0[j : j + 1], probe.noise[j : j + 1], probe.t[j : j + 1]
        total += float(diffusion_loss(host, x0.to(host.device), noise.to(host.device), t, cond))
    return total / len(probe.t)


def export(
    result: TrainResult,
    out_dir: str | Path,
    name: str,
    *,
    overwrite: bool = False,
    preview: Image.Image | None = None,
    save_dtype: torch.dtype = torch.float32,
    save_state: bool = False,
) -> Path:
    """Write ``<name>.safetensors`` + ``.json`` card (+ ``.preview.png``).

    ``save_state``: also write ``<name>.ostaf-state``, the hypernetwork's parameters and
    config (for inspection or your own tooling; nothing in OSTAF reads it back, and it is
    several times the LoRA's size). Off by default; overwriting without it removes a
    stale sidecar of the same name, so it never describes another adapter.

    Overwriting without a ``preview`` removes the old ``.preview.png``: the card never
    shows an earlier adapter's picture. Every target is checked before anything is
    written, so a refusal loses nothing.
    """
    name = validate_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / name
    state_path = stem.with_name(name + STATE_SUFFIX)
    emb_dir = stem.with_name(name + EMBEDDINGS_FOLDER)
    emb_paths = {t: emb_dir / (file_stem(t) + EMBEDDING_SUFFIX) for t in result.embeddings}
    if not overwrite:  # an old sidecar counts even when none is written: never mismatched
        _refuse_existing(out, name, emb_paths.values(), preview=preview is not None)
    metadata = _adapter_metadata(result, name, emb_dir, emb_paths)
    if save_state:
        _write_network_state(state_path, result, overwrite=overwrite)
    _write_attribute_card(stem, result.config, result.info.family, overwrite=overwrite)
    if preview is not None:
        write_preview(stem, preview, overwrite=overwrite)
    for token, p in emb_paths.items():
        emb_dir.mkdir(exist_ok=True)
        save_embedding(p, result.embeddings[token], result.info.family, overwrite=overwrite)
    path = save_adapter(
        stem.with_name(name + ".safetensors"),
        result.lora_modules(),
        metadata,
        overwrite=overwrite,
        dtype=save_dtype,
    )
    if not save_state:
        state_path.unlink(missing_ok=True)  # a stale sidecar of an earlier adapter
    if preview is None and overwrite:  # an earlier adapter's card picture
        stem.with_name(name + PREVIEW_SUFFIX).unlink(missing_ok=True)
    return path


def _refuse_existing(out: Path, name: str, emb_paths: Iterable[Path], *, preview: bool) -> None:
    """InputError naming every file of the export already in ``out`` (the adapter, state
    sidecar, card, embeddings and, with a ``preview``, its picture)."""
    stem = out / name
    paths = [stem.with_name(name + s) for s in (".safetensors", STATE_SUFFIX, ".json")]
    paths += emb_paths
    if preview:
        paths.append(stem.with_name(name + ".preview.png"))
    existing = [p.name for p in paths if p.exists()]
    if existing:
        raise InputError(
            f"{', '.join(existing)} already exist(s) in {out}; choose another name or overwrite"
        )


def _adapter_metadata(
    result: TrainResult, name: str, emb_dir: Path, emb_paths: dict[str, Path]
) -> dict[str, str]:
    """The adapter file's kohya/modelspec metadata with the ``ostaf.*`` record of the run."""
    cfg = result.config
    meta = result.host_meta
    targets = [t.kohya for t in result.targets]
    training = settings_record(cfg) | {
        "steps_done": len(result.losses),
        "seconds": round(result.seconds, 1),
    }
    return build_metadata(
        name=name,
        family=result.info.family,
        prediction_type=meta.get("prediction_type", "epsilon"),
        rank=cfg.rank,
        alpha=float(cfg.rank),
        resolution=int(meta.get("resolution", 512)),
        method="attribute",
        trigger_phrase=cfg.token,
        ostaf={
            "attribute": cfg.attribute,
            "parts": parts_table(result.parts),
            "part": sorted({t.part for t in result.targets}),
            "targets": targets,
            "rank": cfg.rank,
            "default_lambda": cfg.default_lambda,
            "token": cfg.token,
            "prompt": cfg.training_prompt,
            "network": cfg.network,
            "base_model": meta.get("base_model", ""),
            "training": training,
            "loss_probe": [round(result.probe_loss_before, 6), round(result.probe_loss_after, 6)],
            "version": __version__,
        }
        | (
            {
                "embeddings": {t: f"{emb_dir.name}/{p.name}" for t, p in emb_paths.items()},
                "token_init": TOKEN_INIT,
            }
            if emb_paths
            else {}
        ),
    )


def _write_network_state(path: Path, result: TrainResult, *, overwrite: bool) -> None:
    """The ``.ostaf-state`` sidecar: the offset network's parameters (float32) and config."""
    cfg = result.config
    state = {
        k: v.detach().float().cpu().contiguous() for k, v in result.network.state_dict().items()
    }
    state_config = {
        "network": cfg.network,
        "hypernet": result.network.config.to_dict(),
        "layers": [asdict(layer) for layer in result.network.layers],
        "attribute_config": asdict(cfg),
    }
    write_state(path, state, state_config, overwrite=overwrite)


def _write_attribute_card(
    stem: Path, cfg: AttributeConfig, family: str, *, overwrite: bool
) -> None:
    """The WebUI card (``<name>.json``): preferred λ, trigger word and description."""
    write_card(
        stem,
        preferred_weight=cfg.default_lambda,
        activation_text=cfg.token,
        description=(
            f"OSTAF {cfg.attribute} adapter trained on one image with '{cfg.training_prompt}'"
        ),
        sd_version=sd_version_label(family),
        overwrite=overwrite,
    )


def settings_record(config: AttributeConfig) -> dict[str, Any]:
    """The settings as ``ostaf.training`` records them: the attribute's defaults resolved
    (per part for a combined attribute)."""
    if config.combined:
        first, *later = config.part_configs()
        parts = {first.attribute: settings_record(first)}
        for c in later:  # trained on the first part's token, if it learns one (Placeholder)
            spliced = list(SPLICE_LAMBDAS) if first.token_lr_ > 0 else []
            parts[c.attribute] = settings_record(c) | {"spliced_token_lambdas": spliced}
        return asdict(config) | {"parts": parts}
    return asdict(config) | {
        "timestep_range": list(config.timesteps),
        "lr": config.lr_,
        "token_lr": config.token_lr_,
    }
