"""An object implantation as a WebUI starts it: validate, train, preview, sweep, export.

The object counterpart of :mod:`lib_ostaf.webui.training_job` (same :class:`Reporter` and
:class:`TrainOutcome`): the tab or the API sends one image, one token + class per object
and a mask per object (or none: automatic masks, written next to the adapter for
correction). Every check that needs no model runs before the first step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from lib_ostaf.errors import InputError
from lib_ostaf.files.filenames import validate_name
from lib_ostaf.files.hashes import file_hashes
from lib_ostaf.method.embeddings import check_new_tokens
from lib_ostaf.method.host import Host
from lib_ostaf.method.images import load_image
from lib_ostaf.method.masks import MaskSource, load_mask
from lib_ostaf.method.objects import (
    ObjectConfig,
    ObjectSpec,
    export_objects,
    objects_from_lists,
    planned_files,
    refuse_existing,
    train_objects,
)
from lib_ostaf.method.offsets import check_lambda
from lib_ostaf.method.train import Callbacks
from lib_ostaf.webui.run_settings import RunRequest
from lib_ostaf.webui.training_job import (
    MAX_STEPS,
    Reporter,
    TrainOutcome,
    preview_sampler,
    sweep_and_preview,
)

MAX_OBJECTS = 4


@dataclass
class ObjectRequest(RunRequest):
    """What the tab or the API asks for: parallel lists, one entry per object.

    ``masks`` is empty (automatic masks) or one mask per object. ``clip`` is the CLIP image
    tower of the prototypical initialisation: a folder (the WebUI setting), "auto" (below
    ``clip_dirs``, the WebUI's image-encoder folders, then the local Hugging Face cache;
    :func:`lib_ostaf.method.towers.find_tower`, never a download) or "none". Without a tower that
    matches the loaded text encoder the class word is used, and the log and card say why.
    ``clip_dirs`` is set by the host glue, never by an API body.
    """

    image: Image.Image | str | Path | None
    name: str
    tokens: Sequence[str] = ()
    classes: Sequence[str] = ()
    masks: Sequence[MaskSource | None] = ()
    steps: int = ObjectConfig.steps
    embedding_steps: int = ObjectConfig.embedding_steps
    rank: int = ObjectConfig.rank
    lr: float = ObjectConfig.lr
    embedding_lr: float = ObjectConfig.embedding_lr
    class_weight: float = ObjectConfig.class_weight
    background_weight: float = ObjectConfig.background_weight
    seed: int = ObjectConfig.seed
    clip: str = ObjectConfig.clip
    clip_dirs: tuple[str, ...] = ()
    default_lambda: float = ObjectConfig.default_lambda
    preview_every: int = ObjectConfig.preview_every
    precision: str = ObjectConfig.precision
    gradient_checkpointing: str = ObjectConfig.gradient_checkpointing
    kind: ClassVar[str] = "object"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjectRequest:
        if "clip_dirs" in data:  # set by the host glue only
            raise InputError("unknown object settings: clip_dirs")
        return super().from_dict(data)

    @property
    def total_steps(self) -> int:
        return int(self.steps) + (int(self.embedding_steps) if self.embedding_lr else 0)

    def objects(self, image: Image.Image) -> list[ObjectSpec]:
        """The objects, masks checked against ``image`` (a missing mask = automatic)."""
        tokens = [str(t).strip() for t in self.tokens]
        classes = [str(c).strip() for c in self.classes]
        if len(tokens) > MAX_OBJECTS:
            raise InputError(f"at most {MAX_OBJECTS} objects per image, got {len(tokens)}")
        check_new_tokens(tokens, ())  # well-formed and distinct; the vocabulary: at training
        masks = list(self.masks)
        given = [m is not None for m in masks]
        if any(given) and not all(given):
            missing = [tokens[i] for i, g in enumerate(given) if not g and i < len(tokens)]
            raise InputError(
                f"no mask for {', '.join(missing) or 'some objects'}: draw or upload a mask for "
                "every object, or for none (automatic masks)"
            )
        specs = objects_from_lists(tokens, classes, masks if any(given) else ())
        for spec in specs:
            if spec.mask is not None:
                load_mask(spec.mask, image.size, label=f"mask of {spec.token}")
        return specs

    def config(self) -> ObjectConfig:
        if int(self.steps) > MAX_STEPS or int(self.embedding_steps) > MAX_STEPS:
            raise InputError(f"steps must be at most {MAX_STEPS}")
        clip = str(self.clip or "auto").strip() or "auto"
        if clip.lower() not in ("auto", "none") and not Path(clip).expanduser().is_dir():
            raise InputError(
                f"CLIP vision tower {clip!r} is not a folder (a CLIPModel or "
                "CLIPVisionModelWithProjection folder with config.json; empty = auto)"
            )
        return ObjectConfig(
            steps=int(self.steps),
            embedding_steps=int(self.embedding_steps),
            rank=int(self.rank),
            lr=float(self.lr),
            embedding_lr=float(self.embedding_lr),
            class_weight=float(self.class_weight),
            background_weight=float(self.background_weight),
            seed=int(self.seed),
            clip=str(Path(clip).expanduser()) if clip.lower() not in ("auto", "none") else clip,
            default_lambda=check_lambda(self.default_lambda),
            preview_every=max(0, int(self.preview_every)),
            precision=self.precision,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def validate(self, out_dir: Path | str) -> tuple[ObjectConfig, Image.Image, list[ObjectSpec]]:
        """All checks that need no model: name, image, objects and masks, settings, files."""
        validate_name(self.name)
        if self.image is None:
            raise InputError("no image: upload the image that shows the object(s)")
        image = load_image(self.image)
        specs = self.objects(image)
        config = self.config()
        self.check_run_settings()
        if not self.overwrite:
            refuse_existing(self.files(out_dir, specs))
        return config, image, specs

    def files(self, out_dir: Path | str, specs: Sequence[ObjectSpec]) -> Any:
        auto = [s.mask is None for s in specs]
        return planned_files(
            out_dir,
            self.name,
            [s.token for s in specs],
            auto,
            preview=True,
            save_state=bool(self.save_state),
        )


def run_object_training(
    host: Host,
    request: ObjectRequest,
    out_dir: Path | str,
    reporter: Reporter | None = None,
) -> TrainOutcome:
    """Implant on ``host``'s loaded model and write the files into ``out_dir``."""
    reporter = reporter or Reporter()
    config, image, specs = request.validate(out_dir)
    prompt = config.prompt_for([s.token for s in specs])
    callbacks = Callbacks(progress=reporter.progress, should_stop=reporter.should_stop)
    sample = preview_sampler(host, request, prompt)
    if config.preview_every:
        callbacks.preview = lambda step: reporter.preview(
            step, sample(callbacks.preview_embeddings)
        )
    reporter.log(
        f"implanting {', '.join(f'{s.token} ({s.class_name})' for s in specs)} as {request.name!r}:"
        f" {request.total_steps} steps, rank {config.rank}"
        + ("" if specs[0].mask is not None else "; automatic masks")
    )
    with torch.inference_mode(False), torch.enable_grad():
        result = train_objects(
            host, image, specs, config, callbacks, tower_dirs=tuple(request.clip_dirs)
        )
        _log_implantation(result, reporter)
        strip, card_preview = sweep_and_preview(
            host, result, request.sweep, config.default_lambda,
            lambda _lam: sample(result.embeddings), reporter,
        )  # fmt: skip
    files = export_objects(
        result,
        out_dir,
        request.name,
        overwrite=request.overwrite,
        preview=card_preview,
        save_state=bool(request.save_state),
    )
    return _object_outcome(files, result, request, specs, strip, card_preview, reporter)


def _log_implantation(result: Any, reporter: Reporter) -> None:
    """Each token's start (prototypical embedding or class word) and the object losses."""
    reporter.log(result.prototype_summary())
    for p in result.prototypes:
        if p.cos_prototype is not None:
            reporter.log(
                f"{p.token}: prototypical embedding ({p.encoder}), cosine to the prototype "
                f"{p.cos_class_word:.3f} → {p.cos_prototype:.3f}"
            )
        else:
            reporter.log(f"{p.token}: starts from its class word (fell back to the class word)")
    for label, (before, after) in result.probe.items():
        reporter.log(f"object loss '{label}': {before:.4f} → {after:.4f}")


def _object_outcome(
    files: Any,
    result: Any,
    request: ObjectRequest,
    specs: Sequence[ObjectSpec],
    strip: Image.Image | None,
    card_preview: Image.Image | None,
    reporter: Reporter,
) -> TrainOutcome:
    """The written files logged, and the run's outcome (probe losses averaged over objects)."""
    size = files.lora.stat().st_size
    for path in files.all():
        reporter.log(f"wrote {path}")
    before = sum(b for b, _ in result.probe.values()) / max(1, len(result.probe))
    after = sum(a for _, a in result.probe.values()) / max(1, len(result.probe))
    return TrainOutcome(
        path=files.lora,
        size=size,
        short_hash=file_hashes(files.lora)["short"],
        seconds=result.seconds,
        layers=len(result.targets),
        loss_before=before,
        loss_after=after,
        steps=len(result.losses),
        sweep=strip,
        sweep_lambdas=tuple(request.sweep),
        preview=card_preview,
        extra={
            "tokens": [s.token for s in specs],
            "classes": [s.class_name for s in specs],
            "embeddings": {t: str(p) for t, p in files.embeddings.items()},
            "masks": {t: str(p) for t, p in files.masks.items()},
        },
    )
