"""Adapter metadata: kohya ``ss_*``, ModelSpec ``modelspec.*`` and ``ostaf.*`` keys."""

from __future__ import annotations

import datetime as _dt
import json
import math

from lib_ostaf import __version__
from lib_ostaf.errors import InputError
from lib_ostaf.files.filenames import validate_name
from lib_ostaf.files.naming import FAMILIES

# λ range a user can expect to work: 0 is the base model, 1 the learned strength, above
# 1 extrapolates (the README's sweeps: fidelity levels off past 1)
LAMBDA_RANGE = (0.0, 1.5)


def usage_hint(default_lambda: object, trigger_phrase: str = "") -> str:
    """``modelspec.usage_hint``: the λ range, the default λ and the trigger, one line."""
    try:
        default = float(default_lambda)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        default = 1.0
    lo, hi = LAMBDA_RANGE
    hint = f"LoRA weight (λ) {lo:g} to {hi:g}, default {default:g}; 0 is the base model."
    return hint + (f" Trigger: {trigger_phrase}." if trigger_phrase else "")


def build_metadata(
    *,
    name: str,
    family: str,
    prediction_type: str,
    rank: int,
    alpha: float,
    resolution: int,
    method: str,
    ostaf: dict[str, object],
    trigger_phrase: str = "",
    title: str | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` + ``modelspec.*`` + ``ostaf.*`` metadata (all str -> str).

    ``ostaf`` entries become ``ostaf.<key>``; non-str values are JSON-encoded.
    ``ostaf.method`` and ``ostaf.version`` are filled in unless given.
    """
    alpha = _check_arguments(name, family, prediction_type, method, rank, resolution, alpha)
    v = prediction_type == "v_prediction"
    base, arch, impl = _base_model(family, v)
    md: dict[str, str] = {
        "ss_output_name": name,
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": base,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({}),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch + "/lora",
        "modelspec.implementation": impl,
        "modelspec.title": title if title is not None else name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if v else "epsilon",
    }
    if trigger_phrase:
        md["modelspec.trigger_phrase"] = trigger_phrase
    md["modelspec.usage_hint"] = usage_hint(ostaf.get("default_lambda", 1.0), trigger_phrase)
    extra: dict[str, object] = {"version": __version__, **ostaf, "method": method}
    md |= _ostaf_entries(extra)
    return md


def _check_arguments(
    name: str,
    family: str,
    prediction_type: str,
    method: str,
    rank: int,
    resolution: int,
    alpha: float,
) -> float:
    """Check :func:`build_metadata`'s arguments (InputError); return alpha as a float."""
    validate_name(name)
    if family not in FAMILIES:
        raise InputError(f"Unknown model family {family!r}; expected one of {FAMILIES}.")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(
            f"Unknown prediction type {prediction_type!r}; expected 'epsilon' or 'v_prediction'."
        )
    if method not in ("attribute", "object"):
        raise InputError(f"Unknown method {method!r}; expected 'attribute' or 'object'.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"LoRA rank must be a positive integer, got {rank!r}.")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise InputError(f"Resolution must be a positive integer, got {resolution!r}.")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise InputError(f"LoRA alpha must be a finite number > 0, got {alpha!r}.")
    return alpha


def _base_model(family: str, v: bool) -> tuple[str, str, str]:
    """(kohya base model version, ModelSpec architecture, implementation) of a family."""
    if family == "sd1":
        base, arch, impl = "sd_v1", "stable-diffusion-v1", "diffusers"
    elif family == "sd2":
        base = "sd_v2_v" if v else "sd_v2"
        arch = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
        impl = "diffusers"
    else:
        base, arch = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
        impl = "https://github.com/Stability-AI/generative-models"
    return base, arch, impl


def _ostaf_entries(extra: dict[str, object]) -> dict[str, str]:
    """``ostaf.<key>`` metadata: str values as they are, others JSON-encoded."""
    md: dict[str, str] = {}
    for key, value in extra.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"ostaf metadata keys must be non-empty strings, got {key!r}.")
        if isinstance(value, str):
            md["ostaf." + key] = value
        else:
            try:
                md["ostaf." + key] = json.dumps(value, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise InputError(f"ostaf metadata {key!r} is not JSON-serialisable: {e}") from e
    return md


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise InputError("Adapter metadata must be a dict of str -> str.")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InputError(f"Adapter metadata must be str -> str; {k!r} -> {type(v).__name__}.")
    return dict(metadata)


_FAMILY_PREFIXES = {  # metadata key → (value prefix, family), most specific first
    "ss_base_model_version": (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")),
    "modelspec.architecture": (
        ("stable-diffusion-xl", "sdxl"),
        ("stable-diffusion-v2", "sd2"),
        ("stable-diffusion-v1", "sd1"),
    ),
}


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """'sd1' / 'sd2' / 'sdxl' from kohya or modelspec metadata (kohya's first); None if
    unknown."""
    for key, prefixes in _FAMILY_PREFIXES.items():
        value = metadata.get(key, "")
        for prefix, family in prefixes:
            if value.startswith(prefix):
                return family
    return None


def sd_version_label(family: str | None) -> str:
    """A1111 card 'sd version' for a family: SD1 / SD2 / SDXL / Unknown."""
    return {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}.get(family or "", "Unknown")
