"""Where the standalone model runs and in which dtype its weights load (CLI, batch, Python).

One place for the choice, so the CLI, :mod:`lib_ostaf.batch` and
:meth:`~lib_ostaf.hosts.diffusers_host.DiffusersHost.load` agree:

* **device** — ``auto`` is CUDA if present, then Apple's MPS, then the CPU; or name one:
  ``cuda``, ``cuda:N``, ``mps``, ``cpu``. Naming one that is not there is an
  :class:`~lib_ostaf.errors.InputError`, never a silent fall-back to the CPU.
* **dtype** — ``auto`` loads the weights in half precision on a GPU (bf16 on a CUDA GPU
  that supports it, otherwise fp16) and in fp32 on the CPU; or ``fp32``, ``fp16``, ``bf16``.
  Training on fp16 weights scales the loss (:mod:`lib_ostaf.method.memory`).

The WebUI hosts (A1111, Forge) never use this: they train the model the WebUI already
loaded, on its device and in its dtype.
"""

from __future__ import annotations

import re

import torch

from lib_ostaf.errors import InputError

DTYPES = ("auto", "fp32", "fp16", "bf16")
DTYPE_OF = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAME_OF = {v: k for k, v in DTYPE_OF.items()}
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def choose_device(spec: str | torch.device | None = "auto", *, local_rank: int = 0) -> torch.device:
    """``spec`` as a device that exists here (``auto``/None: CUDA, then MPS, then CPU).

    ``local_rank`` picks the GPU of one process of a multi-GPU launch under ``auto``
    (``cuda:<local_rank mod GPU count>``); a named device is used as named.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = (spec or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise InputError("device mps: Apple's Metal (MPS) backend is not available here")
        return torch.device("mps")
    match = _CUDA.match(name)
    if not match:
        raise InputError(f"device must be one of auto, cuda, cuda:N, mps, cpu; got {spec!r}")
    if not torch.cuda.is_available():
        raise InputError(
            f"device {name}: no CUDA GPU is available (PyTorch {torch.__version__}); "
            "use --device cpu or auto"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(f"device {name}: there are only {count} CUDA GPU(s) (cuda:0…)")
    return torch.device("cuda", index)


def choose_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' dtype on ``device``: ``auto``/None is half on a GPU, fp32 on the CPU."""
    if isinstance(spec, torch.dtype):
        if spec not in NAME_OF:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {spec}")
        return spec
    name = (spec or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in DTYPE_OF:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {spec!r}")
    return DTYPE_OF[name]


def check_resolution(resolution: int | None) -> int | None:
    """``resolution`` in pixels (None or 0 = the model's own) or InputError: a multiple of 8
    from 64 to 4096, the WebUI tab's and API's rule
    (:meth:`lib_ostaf.webui.run_settings.RunRequest.check_run_settings`)."""
    if resolution is None or (isinstance(resolution, int) and resolution == 0):
        return None
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise InputError(f"resolution must be a whole number of pixels, got {resolution!r}")
    if not 64 <= resolution <= 4096 or resolution % 8:
        raise InputError(f"resolution must be a multiple of 8 from 64 to 4096, got {resolution}")
    return resolution
