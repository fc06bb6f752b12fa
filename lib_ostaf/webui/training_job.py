"""A training run as a WebUI starts it: validate first, train, preview, sweep, export.

Host-agnostic (A1111 and Forge glue call :func:`run_training` with their host adapter and a
:class:`Reporter` that forwards progress to their own progress bar). Everything that can be
refused — name, existing files, image, settings — is checked before the first step, so a
bad request costs no training time and writes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from lib_ostaf.errors import InputError, Interrupted
from lib_ostaf.files.filenames import ADAPTER_SUFFIX, CARD_SUFFIX, STATE_SUFFIX, validate_name
from lib_ostaf.files.hashes import file_hashes
from lib_ostaf.method.embeddings import placeholder_at
from lib_ostaf.method.host import Host
from lib_ostaf.method.images import load_image
from lib_ostaf.method.offsets import OffsetHooks, check_lambda
from lib_ostaf.method.targets import find_module
from lib_ostaf.method.train import (
    AttributeConfig,
    Callbacks,
    TrainResult,
    export,
    train_attribute,
)
from lib_ostaf.webui.preview import lambda_strip, render
from lib_ostaf.webui.run_settings import RunRequest

MAX_STEPS = 100_000


@dataclass
class TrainRequest(RunRequest):
    """What the tab or the API asks for. ``resolution`` 0 = the model's native size. Every
    default is AttributeConfig's (the method) or RUN's (what every run shares)."""

    image: Image.Image | str | Path | None
    name: str
    attribute: str = AttributeConfig.attribute
    token: str = AttributeConfig.token
    prompt: str = AttributeConfig.prompt
    steps: int = AttributeConfig.steps
    rank: int = AttributeConfig.rank
    lr: float | None = AttributeConfig.lr  # None or 0: the attribute's default
    seed: int = AttributeConfig.seed
    network: str = AttributeConfig.network
    include_mid: bool = AttributeConfig.include_mid
    attn: tuple[str, ...] = AttributeConfig.attn
    proj: tuple[str, ...] = AttributeConfig.proj
    blocks: tuple[str, ...] | None = AttributeConfig.blocks
    default_lambda: float = AttributeConfig.default_lambda
    n_views: int = AttributeConfig.n_views
    preview_every: int = AttributeConfig.preview_every
    precision: str = AttributeConfig.precision
    gradient_checkpointing: str = AttributeConfig.gradient_checkpointing
    kind: ClassVar[str] = "training"

    def config(self) -> AttributeConfig:
        """The trainer's settings (validated: raises InputError)."""
        if self.steps > MAX_STEPS:
            raise InputError(f"steps must be at most {MAX_STEPS}, got {self.steps}")
        return AttributeConfig(
            attribute=self.attribute,
            token=(self.token or AttributeConfig.token).strip(),
            prompt=self.prompt.strip(),
            steps=self.steps,
            rank=self.rank,
            lr=self.lr or None,
            seed=self.seed,
            network=self.network,
            n_views=self.n_views,
            include_mid=bool(self.include_mid),
            attn=tuple(self.attn),
            proj=tuple(self.proj),
            blocks=tuple(self.blocks) if self.blocks else None,
            default_lambda=check_lambda(self.default_lambda),
            preview_every=max(0, int(self.preview_every)),
            precision=self.precision,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def validate(self, out_dir: Path | str) -> tuple[AttributeConfig, Image.Image]:
        """All checks that need no model: name, files, image, settings."""
        validate_name(self.name)
        if self.image is None:
            raise InputError("no reference image: upload one image to learn from")
        image = load_image(self.image)
        config = self.config()
        self.check_run_settings()
        if not self.overwrite:
            out = Path(out_dir)
            taken = [
                out / (self.name + s)
                for s in (ADAPTER_SUFFIX, STATE_SUFFIX, CARD_SUFFIX)
                if (out / (self.name + s)).exists()
            ]
            if taken:
                raise InputError(
                    f"an adapter named {self.name!r} already exists in {out}; choose another "
                    "name or tick 'overwrite'"
                )
        return config, image


class Reporter:
    """What the host glue hears from a run. Override what you need."""

    def progress(self, step: int, total: int, loss: float) -> None: ...

    def preview(self, step: int, image: Image.Image) -> None: ...

    def phase(self, label: str, done: int, total: int) -> None:
        """Work after the training steps (the λ sweep): ``done`` of ``total`` images."""

    def log(self, line: str) -> None: ...

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainOutcome:
    path: Path
    size: int
    short_hash: str
    seconds: float
    layers: int
    loss_before: float
    loss_after: float
    steps: int
    sweep: Image.Image | None = None
    sweep_lambdas: tuple[float, ...] = ()
    preview: Image.Image | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.path.name[: -len(ADAPTER_SUFFIX)],
            "path": str(self.path),
            "size": self.size,
            "hash": self.short_hash,
            "seconds": round(self.seconds, 2),
            "layers": self.layers,
            "loss_before": round(self.loss_before, 6),
            "loss_after": round(self.loss_after, 6),
            "steps": self.steps,
            "sweep_lambdas": list(self.sweep_lambdas),
            **self.extra,
        }


@contextlib.contextmanager
def preserve_module_state(root: torch.nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` and every module's train/eval mode."""
    grads = [(p, p.requires_grad) for p in root.parameters()]
    modes = [(m, m.training) for m in root.modules()]
    try:
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def run_training(
    host: Host,
    request: TrainRequest,
    out_dir: Path | str,
    reporter: Reporter | None = None,
) -> TrainOutcome:
    """Train on ``host``'s loaded model, write the adapter into ``out_dir``; see module doc."""
    reporter = reporter or Reporter()
    config, image = request.validate(out_dir)
    with torch.inference_mode(False), torch.enable_grad():
        sample = preview_sampler(host, request, config.training_prompt)
        result = _train_reported(host, request, config, image, sample, reporter)

        def at_lambda(lam: float) -> Image.Image:  # the placeholder scaled as at generation
            return sample(placeholder_at(result.embeddings, result.token_init, lam))

        strip, card_preview = sweep_and_preview(
            host, result, request.sweep, config.default_lambda, at_lambda, reporter
        )
    path = export(
        result,
        out_dir,
        request.name,
        overwrite=request.overwrite,
        preview=card_preview,
        save_state=bool(request.save_state),
    )
    size = path.stat().st_size
    reporter.log(f"wrote {path} ({size / 1024:.1f} KiB)")
    return TrainOutcome(
        path=path,
        size=size,
        short_hash=file_hashes(path)["short"],
        seconds=result.seconds,
        layers=len(result.targets),
        loss_before=result.probe_loss_before,
        loss_after=result.probe_loss_after,
        steps=len(result.losses),
        sweep=strip,
        sweep_lambdas=tuple(request.sweep),
        preview=card_preview,
    )


def preview_sampler(host: Host, request: RunRequest, prompt: str) -> Callable[..., Image.Image]:
    """``sample(embeddings)``: one preview of ``prompt`` with those token vectors (attribute
    and object runs) at the request's preview size (0: the host's training size); the empty
    prompt is encoded once, at the first sample."""
    preview_size = int(request.preview_size or host.resolution)
    uncond: list[Any] = []

    def sample(embeddings: Mapping[str, Sequence[torch.Tensor]] | None = None) -> Image.Image:
        with torch.no_grad():
            if not uncond:
                uncond.append(host.encode_prompt("") if request.guidance != 1.0 else None)
            on_device = (
                {t: [v.to(host.device) for v in vs] for t, vs in embeddings.items()}
                if embeddings
                else None
            )
            cond = host.encode_prompt(prompt, on_device)
        return render(
            host,
            cond,
            uncond[0],
            steps=request.preview_steps,
            seed=request.seed,
            size=preview_size,
            guidance=request.guidance,
        )

    return sample


def _train_reported(
    host: Host,
    request: TrainRequest,
    config: AttributeConfig,
    image: Image.Image,
    sample: Callable[..., Image.Image],
    reporter: Reporter,
) -> TrainResult:
    """:func:`train_attribute` with the reporter's progress, stop and previews, the run
    logged before and after."""
    callbacks = Callbacks(progress=reporter.progress, should_stop=reporter.should_stop)

    def on_preview(step: int) -> None:
        reporter.preview(step, sample(callbacks.preview_embeddings))

    reporter.log(
        f"training {config.attribute} adapter {request.name!r}: {config.steps} steps, "
        f"rank {config.rank}, prompt '{config.training_prompt}'"
    )
    callbacks.preview = on_preview if config.preview_every else None
    result = train_attribute(host, image, config, callbacks)
    reporter.log(
        f"trained {len(result.targets)} layers in {result.seconds:.1f} s; probe loss "
        f"{result.probe_loss_before:.4f} → {result.probe_loss_after:.4f}"
    )
    return result


def sweep_images(lambdas: Sequence[float], default_lambda: float) -> int:
    """How many images :func:`sweep_and_preview` renders (the card preview at the
    preferred λ is one more when the sweep leaves it out)."""
    if not lambdas:
        return 0
    return len(lambdas) + (0 if float(default_lambda) in [float(x) for x in lambdas] else 1)


def sweep_units(request: Any) -> int:
    """Progress units of the λ sweep after training: one per sampling step of each image
    (a training step counts one too), so the bar keeps moving until the files are written."""
    images = sweep_images(tuple(request.sweep), request.default_lambda)
    return images * max(1, int(request.preview_steps))


def sweep_and_preview(
    host: Host,
    result: Any,
    lambdas: Sequence[float],
    default_lambda: float,
    sample: Callable[[float], Image.Image],
    reporter: Reporter,
) -> tuple[Image.Image | None, Image.Image | None]:
    """The λ-sweep strip of a trained result and the card preview (the image at the
    preferred λ), rendered through forward hooks: the weights are never written.
    ``result`` has ``targets`` and ``factors()`` (attribute and object results);
    ``sample(λ)`` renders one image (λ is for what the hooks do not scale, e.g. a token)."""
    if not lambdas:
        return None, None
    reporter.log("rendering the λ sweep")
    wanted = list(lambdas) if default_lambda in lambdas else [*lambdas, default_lambda]
    modules = {t.kohya: find_module(host.unet, t.name) for t in result.targets}
    images = []
    label = "rendering the λ sweep"
    reporter.phase(label, 0, len(wanted))
    with torch.no_grad(), OffsetHooks(modules) as hooks:
        hooks.factors = {
            k: (a.to(host.device), b.to(host.device)) for k, (a, b) in result.factors().items()
        }
        for i, lam in enumerate(wanted):
            if reporter.should_stop():
                raise Interrupted(
                    f"interrupted during the λ sweep ({i}/{len(wanted)} images); "
                    "nothing was written"
                )
            hooks.scale = float(lam)
            images.append(sample(float(lam)))
            reporter.phase(label, i + 1, len(wanted))
    strip = lambda_strip(images[: len(lambdas)], [f"lambda {x:g}" for x in lambdas])
    return strip, images[wanted.index(default_lambda)]
