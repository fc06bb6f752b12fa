"""Adapter files: kohya-format LoRA ``.safetensors`` plus sidecars.

The LoRA file holds only kohya keys (``<module>.lora_down.weight`` [r, in],
``<module>.lora_up.weight`` [out, r], ``<module>.alpha`` 0-d) with
ΔW = (alpha / r) · up @ down, and kohya/modelspec/``ostaf.*`` string metadata, so it loads
unchanged in A1111, Forge, ComfyUI, diffusers and kohya. Sidecars next to it:

* ``<name>.ostaf-state``: opt-in hypernetwork state, for inspection; nothing reads it back
  to train on (safetensors inside; A1111 does not list it).
* ``<name>.json``: A1111 card (description, sd version, activation text, preferred weight).
* ``<name>.preview.png``: A1111 preview image.

Reading never unpickles: only ``.safetensors`` are accepted and the header is validated
(:mod:`lib_ostaf.files.safetensors_read`) before safetensors sees the file. Every read problem
raises :class:`AdapterFileError`.

1×1 conv LoRA (kohya writes SD1 ``proj_in``/``proj_out`` as [r, in, 1, 1] / [out, r, 1, 1])
is accepted: the weights are squeezed to 2-D and :attr:`LoraModule.conv1x1` remembers the
layout so saving writes the 4-D shapes back. Larger conv kernels are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from lib_ostaf import __version__
from lib_ostaf.errors import AdapterFileError, InputError

# The parts of the format live in their own modules of lib_ostaf.files; this one is the
# LoRA file itself.
from lib_ostaf.files.atomic import atomic_write, refuse_existing_path
from lib_ostaf.files.filenames import ADAPTER_SUFFIX, STATE_SUFFIX, validate_name
from lib_ostaf.files.hashes import content_hashes
from lib_ostaf.files.metadata import check_metadata, family_from_metadata
from lib_ostaf.files.safetensors_read import check_finite_tensors, load_tensors, open_checked

_MODULE_RE = re.compile(r"lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+")
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
_BUNDLE_PREFIX = "bundle_emb."

_LORA_DTYPES = {"F64", "F32", "F16", "BF16"}
_SAVE_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


# --------------------------------------------------------------------------- modules


@dataclass
class LoraModule:
    """One LoRA pair: ``down`` [r, in], ``up`` [out, r]; ΔW = (alpha / r) · up @ down.

    4-D 1×1 conv weights ([r, in, 1, 1] / [out, r, 1, 1]) are squeezed to 2-D on creation
    and ``conv1x1`` is set so that saving restores the conv layout.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    conv1x1: bool = False

    def __post_init__(self) -> None:
        if _is_1x1(self.down) and _is_1x1(self.up):
            self.down = self.down.reshape(self.down.shape[:2])
            self.up = self.up.reshape(self.up.shape[:2])
            self.conv1x1 = True
        self.alpha = float(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW [out, in] computed in fp32 (fp64 if asked), then cast to ``dtype``."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        up, down = self.up.detach().to(work), self.down.detach().to(work)
        return ((self.alpha / self.rank) * (up @ down)).to(dtype)


def _is_1x1(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and tuple(t.shape[2:]) == (1, 1)


def _check_module(name: str, m: LoraModule, err: type[Exception]) -> None:
    """Structural checks shared by save (InputError) and load (AdapterFileError)."""
    if not _MODULE_RE.fullmatch(name):
        raise err(
            f"LoRA module name {name!r} is not a kohya name "
            "(lora_unet_* / lora_te_* / lora_te1_* / lora_te2_*, letters, digits, _)."
        )
    for part, t in (("down", m.down), ("up", m.up)):
        if not isinstance(t, torch.Tensor):
            raise err(f"{name}: lora_{part} is not a tensor.")
        if t.dim() != 2:
            raise err(
                f"{name}: lora_{part} has shape {list(t.shape)}; only linear (2-D) and 1×1 conv "
                "LoRA weights are supported."
            )
        if not t.is_floating_point() or t.dtype not in _SAVE_DTYPES:
            raise err(f"{name}: lora_{part} has dtype {t.dtype}; LoRA weights must be float.")
        if t.numel() == 0:
            raise err(f"{name}: lora_{part} is empty (shape {list(t.shape)}).")
        if not bool(torch.isfinite(t).all()):
            raise err(f"{name}: lora_{part} contains NaN or infinite values.")
    if m.down.shape[0] != m.up.shape[1]:
        raise err(
            f"{name}: rank mismatch, lora_down is {list(m.down.shape)} and lora_up is "
            f"{list(m.up.shape)} (expected [r, in] and [out, r])."
        )
    if not math.isfinite(m.alpha) or m.alpha <= 0:
        raise err(f"{name}: alpha is {m.alpha}; it must be a finite number > 0.")


def lora_state_dict(
    modules: dict[str, LoraModule], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """kohya state dict for ``modules``: contiguous CPU copies, alpha as 0-d float32.

    ``dtype`` (fp32/fp16/bf16/fp64) casts the weights; alpha always stays float32.
    Raises InputError for bad module names, shapes or values.
    """
    if dtype is not None and dtype not in _SAVE_DTYPES:
        raise InputError(f"Cannot save LoRA weights as {dtype}; use float32, float16 or bfloat16.")
    if not modules:
        raise InputError("The adapter has no LoRA modules to save.")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        m = modules[name]
        if not isinstance(m, LoraModule):
            raise InputError(f"{name}: expected a LoraModule, got {type(m).__name__}.")
        _check_module(name, m, InputError)
        down, up = m.down.detach().cpu(), m.up.detach().cpu()
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
            if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
                raise InputError(f"{name}: weights overflow when cast to {dtype}.")
        if m.conv1x1:
            down, up = down[:, :, None, None], up[:, :, None, None]
        # clone: no shared storage (safetensors refuses it) and no aliasing of live weights
        out[name + _DOWN] = down.clone(memory_format=torch.contiguous_format)
        out[name + _UP] = up.clone(memory_format=torch.contiguous_format)
        out[name + _ALPHA] = torch.tensor(m.alpha, dtype=torch.float32)
    return out


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    """Inverse of :func:`lora_state_dict`. Missing alpha means alpha = rank (kohya rule).

    Raises AdapterFileError for foreign keys, incomplete pairs, bad shapes, non-float or
    non-finite weights.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        for suffix in (_DOWN, _UP, _ALPHA):
            if key.endswith(suffix) and _MODULE_RE.fullmatch(key[: -len(suffix)]):
                groups.setdefault(key[: -len(suffix)], {})[suffix] = t
                break
        else:
            raise AdapterFileError(
                f"Key {key!r} is not a kohya LoRA key (<lora_unet_…|lora_te…>.lora_down.weight, "
                ".lora_up.weight or .alpha); LyCORIS/diffusers-format adapters are not supported."
            )
    if not groups:
        raise AdapterFileError("The file contains no LoRA modules.")
    modules: dict[str, LoraModule] = {}
    for name in sorted(groups):
        g = groups[name]
        if _DOWN not in g or _UP not in g:
            missing = "lora_down.weight" if _DOWN not in g else "lora_up.weight"
            raise AdapterFileError(f"{name}: {missing} is missing (incomplete LoRA pair).")
        down, up = g[_DOWN], g[_UP]
        for part, t in (("down", down), ("up", up)):
            if t.dim() == 4 and tuple(t.shape[2:]) != (1, 1):
                raise AdapterFileError(
                    f"{name}: lora_{part} is a {tuple(t.shape[2:])} conv kernel; only linear and "
                    "1×1 conv LoRA are supported."
                )
        if (down.dim() == 4) != (up.dim() == 4):
            raise AdapterFileError(
                f"{name}: lora_down {list(down.shape)} and lora_up {list(up.shape)} disagree "
                "on being linear or conv."
            )
        if _ALPHA in g:
            a = g[_ALPHA]
            if a.numel() != 1 or a.dtype == torch.bool or a.is_complex():
                raise AdapterFileError(f"{name}: alpha must be a single number.")
            alpha = float(a.reshape(()).item())
        else:
            alpha = float(down.shape[0]) if down.dim() >= 1 else float("nan")
        m = LoraModule(down=down, up=up, alpha=alpha)
        _check_module(name, m, AdapterFileError)
        modules[name] = m
    return modules


def _target_path(path: str | Path, suffix: str) -> Path:
    path = Path(path)
    if not path.name.endswith(suffix):
        raise InputError(f"{path.name!r} must end with {suffix}.")
    validate_name(path.name[: -len(suffix)])
    return path


# --------------------------------------------------------------------------- save / load


def save_adapter(
    path: str | Path,
    modules: dict[str, LoraModule],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a kohya LoRA ``.safetensors`` atomically; returns the path.

    The stem must pass :func:`validate_name`; ``ss_output_name`` is set to it and the
    :func:`content_hashes` are added. An existing file is refused (before any other work) unless
    ``overwrite``. ``dtype`` optionally casts the weights (e.g. torch.float16).
    """
    path = _target_path(path, ADAPTER_SUFFIX)
    if not overwrite:
        refuse_existing_path(path)
    md = check_metadata(metadata)
    md["ss_output_name"] = path.name[: -len(ADAPTER_SUFFIX)]
    for key in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
        md.pop(key, None)
    state = lora_state_dict(modules, dtype)
    md |= content_hashes(state, md)
    return atomic_write(path, safetensors.torch.save(state, md), overwrite=overwrite)


@dataclass
class AdapterFile:
    """A loaded adapter. ``embeddings`` holds A1111 ``bundle_emb.<name>.<vec>`` tensors."""

    path: Path
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    identity: tuple[object, ...] = ()  # names the content: (path, size, mtime_ns)

    @property
    def name(self) -> str:
        n = self.path.name
        return n[: -len(ADAPTER_SUFFIX)] if n.lower().endswith(ADAPTER_SUFFIX) else self.path.stem

    @property
    def family(self) -> str | None:
        return family_from_metadata(self.metadata)

    @property
    def prediction_type(self) -> str | None:
        """'epsilon' / 'v_prediction' from metadata; None if unknown."""
        p = self.metadata.get("modelspec.prediction_type")
        if p in ("epsilon", "v"):
            return "v_prediction" if p == "v" else "epsilon"
        base = self.metadata.get("ss_base_model_version")
        if base == "sd_v2_v":
            return "v_prediction"
        return "epsilon" if base in ("sd_v1", "sd_v2", "sdxl_base_v1-0") else None

    @property
    def default_lambda(self) -> float:
        """``ostaf.default_lambda`` if present and a finite number, else 1.0."""
        try:
            value = float(self.metadata.get("ostaf.default_lambda", "1.0"))
        except ValueError:
            return 1.0
        return value if math.isfinite(value) else 1.0

    @property
    def rank(self) -> int:
        """Largest module rank."""
        return max((m.rank for m in self.modules.values()), default=0)


def load_adapter(path: str | Path) -> AdapterFile:
    """Load a kohya LoRA ``.safetensors``; every problem raises AdapterFileError.

    ``bundle_emb.<name>.<vec>`` keys (A1111 bundled embeddings) are returned separately in
    :attr:`AdapterFile.embeddings`; any other non-LoRA key is refused.
    """
    path, header = open_checked(path, ADAPTER_SUFFIX)
    for name, (dtype, *_) in header.tensors.items():
        if dtype not in _LORA_DTYPES and not name.endswith(_ALPHA):
            raise AdapterFileError(
                f"{path}: tensor {name!r} has dtype {dtype}; LoRA weights must be floating point."
            )
    tensors = load_tensors(path)
    if set(tensors) != set(header.tensors):
        raise AdapterFileError(f"{path}: file changed while it was being read.")
    check_finite_tensors(path, tensors)

    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    lora: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith(_BUNDLE_PREFIX):
            emb, _, vec = key[len(_BUNDLE_PREFIX) :].partition(".")
            if not emb or not vec or not t.is_floating_point():
                raise AdapterFileError(f"{path}: malformed bundled embedding key {key!r}.")
            embeddings.setdefault(emb, {})[vec] = t
        else:
            lora[key] = t
    try:
        modules = lora_modules(lora)
    except AdapterFileError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    st = path.stat()
    return AdapterFile(
        path=path,
        modules=modules,
        metadata=header.metadata,
        embeddings=embeddings,
        identity=(
            str(path.resolve()),
            st.st_size,
            st.st_mtime_ns,
            header.metadata.get("sshs_model_hash"),
        ),
    )


# --------------------------------------------------------------------------- state sidecar

_STATE_CONFIG_KEY = "ostaf.state_config"
_STATE_FORMAT_KEY = "ostaf.format"


def save_state(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    overwrite: bool,
) -> Path:
    """Write the hypernetwork state sidecar ``<name>.ostaf-state`` (safetensors inside)."""
    path = _target_path(path, STATE_SUFFIX)
    if not overwrite:
        refuse_existing_path(path)
    if not isinstance(config, dict):
        raise InputError("State config must be a dict.")
    try:
        config_json = json.dumps(config, ensure_ascii=False, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InputError(f"State config is not JSON-serialisable: {e}") from e
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or not isinstance(t, torch.Tensor):
            raise InputError(f"State entry {name!r} must be a named tensor.")
        if name == "__metadata__":
            raise InputError("'__metadata__' is reserved and cannot name a state tensor.")
        t = t.detach().cpu()
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            raise InputError(f"State tensor {name!r} contains NaN or infinite values.")
        state[name] = t.clone(memory_format=torch.contiguous_format)
    md = {_STATE_FORMAT_KEY: "ostaf-state", "ostaf.version": __version__}
    md[_STATE_CONFIG_KEY] = config_json
    try:
        data = safetensors.torch.save(state, md)
    except (ValueError, TypeError, RuntimeError) as e:
        raise InputError(f"Cannot serialise the state: {e}") from e
    return atomic_write(path, data, overwrite=overwrite)


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an ``.ostaf-state`` sidecar: (tensors, config). Problems raise AdapterFileError."""
    path, header = open_checked(path, STATE_SUFFIX)
    if header.metadata.get(_STATE_FORMAT_KEY) != "ostaf-state":
        raise AdapterFileError(f"{path}: not an ostaf state file (missing {_STATE_FORMAT_KEY}).")
    try:
        config = json.loads(header.metadata.get(_STATE_CONFIG_KEY, ""))
    except ValueError as e:
        raise AdapterFileError(f"{path}: state config is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: state config is not a JSON object.")
    tensors = load_tensors(path)
    if set(tensors) != set(header.tensors):
        raise AdapterFileError(f"{path}: file changed while it was being read.")
    check_finite_tensors(path, tensors)
    return tensors, config
