"""Adapter files: kohya-format LoRA ``.safetensors`` plus sidecars.

The LoRA file holds only kohya keys (``<module>.lora_down.weight`` [r, in],
``<module>.lora_up.weight`` [out, r], ``<module>.alpha`` 0-d) with
ΔW = (alpha / r) · up @ down, and kohya/modelspec/``ostaf.*`` string metadata, so it loads
unchanged in A1111, Forge, ComfyUI, diffusers and kohya. Sidecars next to it:

* ``<name>.ostaf-state``: opt-in hypernetwork state, for inspection; nothing reads it back
  to train on (safetensors inside; A1111 does not list it).
* ``<name>.json``: A1111 card (description, sd version, activation text, preferred weight).
* ``<name>.preview.png``: A1111 preview image.

Reading never unpickles: only ``.safetensors`` are accepted and the header is validated here
before safetensors sees the file. Every read problem raises :class:`AdapterFileError`.

1×1 conv LoRA (kohya writes SD1 ``proj_in``/``proj_out`` as [r, in, 1, 1] / [out, r, 1, 1])
is accepted: the weights are squeezed to 2-D and :attr:`LoraModule.conv1x1` remembers the
layout so saving writes the 4-D shapes back. Larger conv kernels are refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import safetensors.torch
import torch

from lib_ostaf import __version__
from lib_ostaf.errors import AdapterFileError, InputError

if TYPE_CHECKING:
    from PIL import Image

ADAPTER_SUFFIX = ".safetensors"
STATE_SUFFIX = ".ostaf-state"
CARD_SUFFIX = ".json"
PREVIEW_SUFFIX = ".preview.png"

NAME_MAX_LEN = 100
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
_NAME_PUNCT = set(" -_.()+")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{p}{i}" for p in ("COM", "LPT") for i in range(10)
}

_MODULE_RE = re.compile(r"lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+")
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
_BUNDLE_PREFIX = "bundle_emb."

# safetensors dtype tag -> (bytes per element, torch dtype or None if torch lacks it)
_ST_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
    "U64": (8, getattr(torch, "uint64", None)),
    "U32": (4, getattr(torch, "uint32", None)),
    "U16": (2, getattr(torch, "uint16", None)),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
}
_LORA_DTYPES = {"F64", "F32", "F16", "BF16"}
_SAVE_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}

_FAMILIES = ("sd1", "sd2", "sdxl")
_SD_VERSIONS = ("SD1", "SD2", "SDXL", "Unknown")


# --------------------------------------------------------------------------- names


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe output name (file stem), else raise InputError."""
    allowed = "letters, digits, spaces and - _ . ( ) +"
    if not isinstance(name, str):
        raise InputError(f"Adapter name must be text, got {type(name).__name__}.")
    if not name or not name.strip():
        raise InputError(f"Adapter name is empty; use 1-{NAME_MAX_LEN} characters: {allowed}.")
    if len(name) > NAME_MAX_LEN:
        raise InputError(f"Adapter name is {len(name)} characters long; at most {NAME_MAX_LEN}.")
    if "/" in name or "\\" in name:
        raise InputError(f"Adapter name {name!r} contains a path separator; allowed: {allowed}.")
    if ".." in name:
        raise InputError(f"Adapter name {name!r} contains '..'; allowed: {allowed}.")
    if name.startswith("."):
        raise InputError(f"Adapter name {name!r} starts with '.'; it would be a hidden file.")
    if name != name.strip():
        raise InputError(f"Adapter name {name!r} starts or ends with a space.")
    for ch in name:
        if unicodedata.category(ch).startswith("C"):
            raise InputError(
                f"Adapter name {name!r} contains a control character "
                f"(U+{ord(ch):04X}); allowed: {allowed}."
            )
        if not (unicodedata.category(ch)[0] in "LM" or ch.isdecimal() or ch in _NAME_PUNCT):
            raise InputError(f"Adapter name {name!r} contains {ch!r}; allowed: {allowed}.")
    if name.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        raise InputError(f"Adapter name {name!r} is reserved by Windows; choose another.")
    return name


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


# --------------------------------------------------------------------------- metadata


def sshs_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya's precalculate_safetensors_hashes.

    Serialises in memory with only the ``ss_*`` metadata; model hash = sha256 of the data
    section, legacy hash = sha256 of bytes [0x100000, 0x110000) of the buffer, first 8 hex.
    """
    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    buf = safetensors.torch.save(state, ss_meta)
    n = int.from_bytes(buf[:8], "little")
    model_hash = hashlib.sha256(buf[8 + n :]).hexdigest()
    legacy_hash = hashlib.sha256(buf[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def content_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The metadata keys that name the tensor bytes (header excluded): kohya's
    ``sshs_model_hash`` / ``sshs_legacy_hash`` and ModelSpec's ``modelspec.hash_sha256``
    (``0x`` + the same SHA-256, which is also Civitai's AutoV3)."""
    model_hash, legacy_hash = sshs_hashes(state, metadata)
    return {
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": legacy_hash,
        "modelspec.hash_sha256": "0x" + model_hash,
    }


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
    validate_name(name)
    if family not in _FAMILIES:
        raise InputError(f"Unknown model family {family!r}; expected one of {_FAMILIES}.")
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
    v = prediction_type == "v_prediction"

    if family == "sd1":
        base, arch, impl = "sd_v1", "stable-diffusion-v1", "diffusers"
    elif family == "sd2":
        base = "sd_v2_v" if v else "sd_v2"
        arch = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
        impl = "diffusers"
    else:
        base, arch = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
        impl = "https://github.com/Stability-AI/generative-models"

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


def _check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise InputError("Adapter metadata must be a dict of str -> str.")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InputError(f"Adapter metadata must be str -> str; {k!r} -> {type(v).__name__}.")
    return dict(metadata)


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """'sd1' / 'sd2' / 'sdxl' from kohya or modelspec metadata; None if unknown."""
    base = metadata.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return "sdxl"
    if base.startswith("sd_v2"):
        return "sd2"
    if base.startswith("sd_v1"):
        return "sd1"
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def sd_version_label(family: str | None) -> str:
    """A1111 card 'sd version' for a family: SD1 / SD2 / SDXL / Unknown."""
    return {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}.get(family or "", "Unknown")


# --------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    # os.umask() would have to set it temporarily (racy in a threaded WebUI); read it instead
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _refuse_existing(path: Path) -> None:
    if _exists(path):
        raise InputError(
            f"{path} already exists; choose another name or enable overwrite. Nothing was written."
        )


TEMP_SUFFIX = ".tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep its file
    return True


def sweep_stale_temps(path: Path) -> list[Path]:
    """Remove temp files of ``path`` left by a process that was killed (SIGKILL, power
    loss) while writing: ``.<name>.<pid>.*.tmp`` whose pid is no longer running."""
    removed = []
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            if not (p.name.startswith(prefix) and p.name.endswith(TEMP_SUFFIX)):
                continue
            pid = p.name[len(prefix) :].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def atomic_write(path: str | Path, data: bytes, *, overwrite: bool) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename.

    Existing files are refused (InputError) unless ``overwrite``; without overwrite the final
    step is a hard link, so a file created meanwhile is not clobbered either. The temp file is
    removed on any failure (KeyboardInterrupt included). OS errors become AdapterFileError.
    """
    path = Path(path)
    if not overwrite:
        _refuse_existing(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; cannot write a file there.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterFileError(f"Cannot create folder {path.parent}: {e}") from e

    sweep_stale_temps(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
            tmp = None
        else:
            try:
                os.link(tmp, path)  # atomic "create if absent"
            except FileExistsError:
                _refuse_existing(path)
                raise
            except OSError:  # filesystem without hard links
                _refuse_existing(path)
                os.replace(tmp, path)
                tmp = None
    except OSError as e:
        raise AdapterFileError(f"Could not write {path}: {e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
        _refuse_existing(path)
    md = _check_metadata(metadata)
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


@dataclass
class _Header:
    size: int  # bytes of the JSON header (after the 8-byte length)
    metadata: dict[str, str]
    tensors: dict[str, tuple[str, list[int], int, int]]  # name -> (dtype, shape, begin, end)


def _reject_constant(value: str) -> Any:
    raise ValueError(f"non-standard JSON constant {value}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def _read_header(f: IO[bytes], file_size: int, where: str) -> _Header:
    """Validate a safetensors header as strictly as the safetensors library does."""
    if file_size < 8:
        raise AdapterFileError(f"{where}: file is {file_size} bytes, too short (truncated?).")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise AdapterFileError(
            f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; "
            "not a safetensors file or corrupted."
        )
    if n > file_size - 8:
        raise AdapterFileError(
            f"{where}: header says {n} bytes but the file has only {file_size - 8} after the "
            "length field (truncated or not a safetensors file)."
        )
    raw = f.read(n)
    if len(raw) != n:
        raise AdapterFileError(f"{where}: file ended inside the header (truncated?).")
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("header does not start with '{'")
        hdr = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterFileError(f"{where}: header is not valid JSON ({e}).") from None
    if not isinstance(hdr, dict):
        raise AdapterFileError(f"{where}: header is not a JSON object.")

    metadata = hdr.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterFileError(f"{where}: __metadata__ must map strings to strings.")

    tensors: dict[str, tuple[str, list[int], int, int]] = {}
    for name, info in hdr.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise AdapterFileError(
                f"{where}: tensor {name!r} entry must have exactly dtype, shape, data_offsets."
            )
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES or _ST_DTYPES[dtype][1] is None:
            raise AdapterFileError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}.")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise AdapterFileError(f"{where}: tensor {name!r} has an invalid shape {shape!r}.")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
            raise AdapterFileError(f"{where}: tensor {name!r} has invalid data_offsets.")
        begin, end = offsets
        nbytes = math.prod(shape) * _ST_DTYPES[dtype][0]
        if end < begin or end - begin != nbytes:
            raise AdapterFileError(
                f"{where}: tensor {name!r} claims {end - begin} bytes but shape {shape} of "
                f"{dtype} needs {nbytes}."
            )
        tensors[name] = (dtype, shape, begin, end)

    # data section: tensors back to back from 0, no gap or overlap, exactly filling the file
    data_len = file_size - 8 - n
    pos = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: kv[1][2:]):
        if begin != pos:
            problem = "overlaps another tensor" if begin < pos else "leaves a gap"
            raise AdapterFileError(f"{where}: tensor {name!r} {problem} in the data section.")
        pos = end
    if pos != data_len:
        state = "truncated" if pos > data_len else "has trailing bytes"
        raise AdapterFileError(
            f"{where}: data section is {data_len} bytes but the header describes {pos} "
            f"(file {state})."
        )
    return _Header(size=n, metadata=metadata, tensors=tensors)


def _open_checked(path: str | Path, suffix: str) -> tuple[Path, _Header]:
    path = Path(path)
    where = str(path)
    sfx = path.suffix.lower()
    if sfx in _PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{where}: only {suffix} files are accepted; pickle files ({sfx}) can run code."
        )
    if not path.name.lower().endswith(suffix):
        raise AdapterFileError(f"{where}: only {suffix} files are accepted.")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(4)
            f.seek(0)
            try:
                header = _read_header(f, size, where)
            except AdapterFileError:
                if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
                    raise AdapterFileError(
                        f"{where}: this looks like a PyTorch pickle/zip file renamed to {suffix}; "
                        "refused because pickle files can run code."
                    ) from None
                raise
    except FileNotFoundError:
        raise AdapterFileError(f"{where}: file not found.") from None
    except IsADirectoryError:
        raise AdapterFileError(f"{where}: is a folder, not a file.") from None
    except OSError as e:
        raise AdapterFileError(f"{where}: cannot read file: {e}") from e
    return path, header


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises several types; report them all the same way
        raise AdapterFileError(f"{path}: safetensors could not read the file: {e}") from e


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            raise AdapterFileError(f"{path}: tensor {name!r} contains NaN or infinite values.")


def load_adapter(path: str | Path) -> AdapterFile:
    """Load a kohya LoRA ``.safetensors``; every problem raises AdapterFileError.

    ``bundle_emb.<name>.<vec>`` keys (A1111 bundled embeddings) are returned separately in
    :attr:`AdapterFile.embeddings`; any other non-LoRA key is refused.
    """
    path, header = _open_checked(path, ADAPTER_SUFFIX)
    for name, (dtype, *_) in header.tensors.items():
        if dtype not in _LORA_DTYPES and not name.endswith(_ALPHA):
            raise AdapterFileError(
                f"{path}: tensor {name!r} has dtype {dtype}; LoRA weights must be floating point."
            )
    tensors = _load_tensors(path)
    if set(tensors) != set(header.tensors):
        raise AdapterFileError(f"{path}: file changed while it was being read.")
    _check_finite(path, tensors)

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
        _refuse_existing(path)
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
    path, header = _open_checked(path, STATE_SUFFIX)
    if header.metadata.get(_STATE_FORMAT_KEY) != "ostaf-state":
        raise AdapterFileError(f"{path}: not an ostaf state file (missing {_STATE_FORMAT_KEY}).")
    try:
        config = json.loads(header.metadata.get(_STATE_CONFIG_KEY, ""))
    except ValueError as e:
        raise AdapterFileError(f"{path}: state config is not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: state config is not a JSON object.")
    tensors = _load_tensors(path)
    if set(tensors) != set(header.tensors):
        raise AdapterFileError(f"{path}: file changed while it was being read.")
    _check_finite(path, tensors)
    return tensors, config


# --------------------------------------------------------------------------- card / preview


def _sidecar(stem_path: str | Path, suffix: str) -> Path:
    p = Path(stem_path)
    stem = p.name[: -len(ADAPTER_SUFFIX)] if p.name.endswith(ADAPTER_SUFFIX) else p.name
    validate_name(stem)
    return p.parent / (stem + suffix)


def write_card(
    stem_path: str | Path,
    *,
    preferred_weight: float,
    activation_text: str,
    description: str,
    sd_version: str,
    notes: str = "",
    overwrite: bool,
) -> Path:
    """Write the A1111 card ``<stem>.json`` (``stem_path`` may also end in .safetensors)."""
    data = card_bytes(
        preferred_weight=preferred_weight,
        activation_text=activation_text,
        description=description,
        sd_version=sd_version,
        notes=notes,
    )
    return atomic_write(_sidecar(stem_path, CARD_SUFFIX), data, overwrite=overwrite)


def card_bytes(
    *,
    preferred_weight: float,
    activation_text: str,
    description: str,
    sd_version: str,
    notes: str = "",
) -> bytes:
    """The A1111 card's JSON (UTF-8); InputError for a bad sd version or weight."""
    if sd_version not in _SD_VERSIONS:
        raise InputError(f"sd_version must be one of {_SD_VERSIONS}, got {sd_version!r}.")
    weight = float(preferred_weight)
    if not math.isfinite(weight):
        raise InputError(f"Preferred weight must be a finite number, got {preferred_weight!r}.")
    card = {
        "description": str(description),
        "sd version": sd_version,
        "activation text": str(activation_text),
        "preferred weight": weight,
        "negative text": "",
        "notes": str(notes),
    }
    return json.dumps(card, indent=4, ensure_ascii=False).encode("utf-8")


def write_preview(stem_path: str | Path, image: Image.Image, *, overwrite: bool) -> Path:
    """Write the A1111 preview ``<stem>.preview.png`` atomically."""
    from PIL import Image as PILImage

    if not isinstance(image, PILImage.Image):
        raise InputError(f"Preview must be a PIL image, got {type(image).__name__}.")
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write(_sidecar(stem_path, PREVIEW_SUFFIX), buf.getvalue(), overwrite=overwrite)


# --------------------------------------------------------------------------- hashes


def _chunks(f: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def file_hashes(path: str | Path) -> dict[str, str]:
    """``sha256`` of the whole file, ``addnet`` (sha256 of the safetensors data section, as
    A1111/addnet compute it) and ``short`` (first 12 hex of addnet)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise AdapterFileError(f"{path}: file is too short to be safetensors.")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise AdapterFileError(f"{path}: header length exceeds the file (truncated?).")
            whole, addnet = hashlib.sha256(), hashlib.sha256()
            f.seek(0)
            remaining_header = 8 + n
            for chunk in _chunks(f):
                whole.update(chunk)
                if remaining_header >= len(chunk):
                    remaining_header -= len(chunk)
                    continue
                addnet.update(chunk[remaining_header:])
                remaining_header = 0
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot read file: {e}") from e
    a = addnet.hexdigest()
    return {"sha256": whole.hexdigest(), "addnet": a, "short": a[:12]}
