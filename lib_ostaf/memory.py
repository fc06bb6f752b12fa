"""Memory and speed options of a training run: mixed precision and gradient checkpointing.

Both work on any host (diffusers, A1111's ldm UNet, Forge) because they act on what every
SD UNet has, not on a framework flag:

* **precision** — ``"auto"`` leaves the computation to the host (A1111/Forge already run
  the UNet in fp16/bf16 through their own autocast); on CUDA with an fp32 UNet ``auto`` is
  bf16 where supported. ``"bf16"``/``"fp16"`` wrap each training forward in
  ``torch.autocast``; fp16 also scales the loss (``GradScaler``) so small gradients do not
  underflow. The trainable factors and the optimizer state stay fp32.
* **gradient checkpointing** — each transformer block and resnet of the UNet keeps only its
  input and recomputes its activations during backward (``torch.utils.checkpoint``,
  non-reentrant, so forward hooks — our offsets — run again with the same factors).
  ``"auto"``: on for SDXL on a GPU, off otherwise (CPU training is compute-bound).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINTING = ("auto", "on", "off")
# Block classes of diffusers, ldm (A1111) and Forge that checkpoint well (self-contained,
# tensor in → tensor out).
CHECKPOINTED = ("BasicTransformerBlock", "ResnetBlock2D", "ResBlock")


def check_options(precision: str, checkpointing: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if checkpointing not in CHECKPOINTING:
        raise InputError(
            f"gradient checkpointing must be one of {', '.join(CHECKPOINTING)}, "
            f"got {checkpointing!r}"
        )


def autocast_dtype(precision: str, device: torch.device, model_dtype: torch.dtype):
    """The autocast dtype for ``precision`` on ``device`` (None = no autocast)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda" or model_dtype != torch.float32:
            return None  # CPU, or the host already computes in half precision
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise InputError("fp16 mixed precision needs a CUDA GPU; use bf16 or fp32 on this device")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def use_checkpointing(checkpointing: str, device: torch.device, family: str) -> bool:
    if checkpointing == "auto":
        return device.type == "cuda" and family == "sdxl"
    return checkpointing == "on"


@contextlib.contextmanager
def gradient_checkpointing(unet: nn.Module) -> Iterator[int]:
    """Checkpoint every block of :data:`CHECKPOINTED` in ``unet`` while inside; yields how
    many. The original ``forward`` methods are restored on exit."""
    blocks = [m for m in unet.modules() if type(m).__name__ in CHECKPOINTED]
    for block in blocks:
        plain = block.forward

        def forward(*args: Any, _plain: Any = plain, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # instance attribute: shadows the class method
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            del block.forward


class Precision:
    """Autocast + loss scaling for :func:`lib_ostaf.train.run_steps`."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # the finite check and the step see true gradients

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def skip(self) -> None:
        if self.scaler is not None:  # inf gradients: lower the scale as GradScaler would
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())


NO_PRECISION = Precision(None, torch.device("cpu"))


@contextlib.contextmanager
def training_options(
    unet: nn.Module, device: torch.device, family: str, precision: str, checkpointing: str
) -> Iterator[Precision]:
    """Enter the run's options; yields the :class:`Precision` for ``run_steps``."""
    check_options(precision, checkpointing)
    dtype = autocast_dtype(precision, device, next(unet.parameters()).dtype)
    with contextlib.ExitStack() as stack:
        if use_checkpointing(checkpointing, device, family):
            stack.enter_context(gradient_checkpointing(unet))
        yield Precision(dtype, device)
