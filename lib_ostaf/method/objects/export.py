"""Writing an object implantation: the kohya LoRA and its card, one portable embedding per
token, the automatic masks and, on request, the A1111 bundle and the ``.ostaf-state`` sidecar.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lib_ostaf import __version__
from lib_ostaf.errors import InputError
from lib_ostaf.files.adapter_file import lora_state_dict, save_adapter
from lib_ostaf.files.adapter_file import save_state as write_state
from lib_ostaf.files.atomic import atomic_write
from lib_ostaf.files.filenames import ADAPTER_SUFFIX, PREVIEW_SUFFIX, STATE_SUFFIX, validate_name
from lib_ostaf.files.hashes import content_hashes
from lib_ostaf.files.metadata import build_metadata, sd_version_label
from lib_ostaf.files.sidecars import write_card, write_preview
from lib_ostaf.method.embeddings import (
    EMBEDDINGS_FOLDER,
    bundle_state_dict,
    file_stem,
    portable_keys,
    save_embedding,
)
from lib_ostaf.method.masks import save_mask
from lib_ostaf.method.objects.training import ObjectResult

BUNDLE_INFIX = ".a1111"  # <name>.a1111.safetensors: LoRA + bundle_emb for A1111
MASK_INFIX = ".mask-"  # <name>.mask-<token>.png (automatic masks)


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
    modules = result.lora_modules()
    rel = {t: _relative(p, out) for t, p in files.embeddings.items()}
    ostaf = _ostaf_metadata(result, rel)
    lora_md = _lora_metadata(result, family, ostaf, name)  # validated before writing anything
    _write_embeddings(files, result, name, family, overwrite)
    for token, path in files.masks.items():
        save_mask(path, result.masks[result.tokens.index(token)], overwrite=overwrite)
    if files.state is not None:
        _write_state(files.state, result, family, overwrite)
    _write_card(files, result, family, rel, preview, overwrite)
    if files.bundle is not None:
        tensors = lora_state_dict(modules, save_dtype)
        _write_bundle(files.bundle, result, family, ostaf, tensors, overwrite)
    save_adapter(files.lora, modules, lora_md, overwrite=overwrite, dtype=save_dtype)
    if files.state is None:
        files.state_path.unlink(missing_ok=True)  # a stale sidecar of an earlier adapter
    if files.preview is None and overwrite:  # an earlier adapter's card picture
        files.lora.with_name(name + PREVIEW_SUFFIX).unlink(missing_ok=True)
    return files


def _ostaf_metadata(result: ObjectResult, rel: dict[str, str]) -> dict[str, Any]:
    """The ``ostaf.*`` metadata of the LoRA (and of the bundle)."""
    cfg = result.config
    training = asdict(cfg) | {
        "steps_done": len(result.losses),
        "seconds": round(result.seconds, 1),
    }
    return {
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


def _lora_metadata(
    result: ObjectResult, family: str, ostaf: dict[str, Any], stem: str
) -> dict[str, str]:
    """The safetensors metadata of a LoRA file named ``stem``."""
    cfg = result.config
    return build_metadata(
        name=stem,
        family=family,
        prediction_type=result.host_meta.get("prediction_type", "epsilon"),
        rank=cfg.rank,
        alpha=float(cfg.rank),
        resolution=int(result.host_meta.get("resolution", 512)),
        method="object",
        trigger_phrase=", ".join(result.tokens),
        ostaf=ostaf,
    )


def _write_embeddings(
    files: ObjectFiles, result: ObjectResult, name: str, family: str, overwrite: bool
) -> None:
    """One portable embedding file per token."""
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


def _write_state(path: Path, result: ObjectResult, family: str, overwrite: bool) -> None:
    """The ``.ostaf-state`` sidecar: network parameters and token vectors, float32."""
    cfg = result.config
    state = {
        f"network.{k}": v.detach().float().cpu().contiguous()
        for k, v in result.network.state_dict().items()
    }
    for token, vecs in result.embeddings.items():
        for key, v in zip(portable_keys(family), vecs, strict=True):
            state[f"embedding.{token}.{key}"] = v
    write_state(
        path,
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


def _description(result: ObjectResult) -> str:
    pairs = zip(result.tokens, result.classes, strict=True)
    return "Object implantation of " + ", ".join(f"{t} ({c})" for t, c in pairs)


def _write_card(
    files: ObjectFiles,
    result: ObjectResult,
    family: str,
    rel: dict[str, str],
    preview: Image.Image | None,
    overwrite: bool,
) -> None:
    """The LoRA's ``.json`` card and, when given, its ``.preview.png``."""
    write_card(
        files.lora,
        preferred_weight=result.config.default_lambda,
        activation_text=", ".join(result.tokens),
        description=_description(result),
        sd_version=sd_version_label(family),
        notes=f"token embeddings: {', '.join(rel.values())}; {result.prototype_summary()}",
        overwrite=overwrite,
    )
    if preview is not None:
        write_preview(files.lora, preview, overwrite=overwrite)


def _write_bundle(
    path: Path,
    result: ObjectResult,
    family: str,
    ostaf: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    overwrite: bool,
) -> None:
    """``<name>.a1111.safetensors`` and its card: the LoRA's ``tensors`` with the embeddings
    as ``bundle_emb.*``."""
    bundle_name = path.name[: -len(ADAPTER_SUFFIX)]
    md = _lora_metadata(result, family, ostaf, bundle_name) | {"ss_output_name": bundle_name}
    tensors = tensors | bundle_state_dict(result.embeddings, family)
    md |= content_hashes(tensors, md)  # sshs_* and modelspec.hash_sha256
    import safetensors.torch

    atomic_write(path, safetensors.torch.save(tensors, md), overwrite=overwrite)
    write_card(
        path,
        preferred_weight=result.config.default_lambda,
        activation_text=", ".join(result.tokens),
        description=_description(result) + " (A1111: embeddings bundled in the LoRA)",
        sd_version=sd_version_label(family),
        overwrite=overwrite,
    )


def _relative(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # another drive on Windows
        return str(path)
