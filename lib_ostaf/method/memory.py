"""Memory and speed options of a training run: mixed precision and gradient checkpointing.

Both work on any host (diffusers, A1111's ldm UNet, Forge) because they act on what every
SD UNet has, not on a framework flag:

* **precision** — ``"auto"`` leaves the computation to the host (A1111/Forge already run
  the UNet in fp16/bf16 through their own autocast); on CUDA with an fp32 UNet ``auto`` is
  bf16 where supported. ``"bf16"``/``"fp16"`` wrap each training forward in
  ``torch.autocast``. Whenever the gradients pass through fp16 — fp16 autocast, or a UNet
  whose weights are fp16 (A1111's and Forge's default on a GPU, the CLI's on a GPU without
  bf16), or a host that computes in fp16 under its own autocast (its ``dtype``), whatever
  ``precision`` says — the loss is scaled dynamically
  (:class:`LossScaler`) so small gradients do not flush to zero. The trainable factors,
  their gradients and the optimizer state stay fp32; every step is checked: non-finite
  steps are skipped, and :data:`ZERO_GRAD_STEPS` all-zero steps in a row stop the run.
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

from lib_ostaf.errors import InputError, TrainingDiverged

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
            return None  # CPU/MPS, or the host already computes in half precision
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type not in ("cuda", "mps"):
        raise InputError(
            "fp16 mixed precision needs a GPU (CUDA or MPS); use bf16 or fp32 on this device"
        )
    return torch.bfloat16 if precision == "bf16" else torch.float16


def needs_loss_scaling(
    autocast: torch.dtype | None, unet: nn.Module, compute: torch.dtype | None = None
) -> bool:
    """Whether the run's gradients pass through fp16 (fp16 autocast, fp16 weights as A1111
    and Forge keep them on a GPU, or a host that computes in fp16 through its own autocast
    — ``compute``, the host's ``dtype`` — whatever its weights): then small ones flush to
    zero unless the loss is scaled. bf16 has fp32's exponent range and needs no scaling."""
    if torch.float16 in (autocast, compute):
        return True
    return any(p.dtype == torch.float16 for p in unet.parameters())


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


class LossScaler:
    """Dynamic loss scaling, as ``torch.amp.GradScaler`` does it, on any device.

    The loss is multiplied by :attr:`scale` before backward so that small gradients stay
    representable in fp16; the (fp32) gradients of the trainable tensors are divided back
    before the finite check and the optimizer step, so the step, AdamW's state and the
    factors never see the scale. A step with non-finite gradients is skipped and halves
    the scale; an all-zero step (every gradient flushed to zero) doubles it; after
    :data:`GROWTH_INTERVAL` good steps in a row it doubles.
    """

    INIT = 2.0**16  # GradScaler's default
    GROWTH_INTERVAL = 100  # GradScaler: 2000; our runs are 100s of steps, not 100 000s
    MIN, MAX = 2.0**-8, 2.0**24

    def __init__(self) -> None:
        self.scale = self.INIT
        self.good = 0

    def unscale(self, params: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1.0 / self.scale)

    def overflow(self) -> bool:
        """Record a non-finite step; True while the scale can still fall (the step is the
        scaler finding its range, not a sign of divergence)."""
        self.good = 0
        if self.scale <= 1.0:
            return False
        self.scale = max(self.MIN, self.scale / 2)
        return True

    def stepped(self, zero: bool) -> None:
        if zero:  # underflow: every gradient flushed to zero
            self.good = 0
            self.scale = min(self.MAX, self.scale * 2)
            return
        self.good += 1
        if self.good >= self.GROWTH_INTERVAL:
            self.good = 0
            self.scale = min(self.MAX, self.scale * 2)


class Precision:
    """Autocast + loss scaling for :func:`lib_ostaf.method.train.run_steps`.

    ``scaling``: scale the loss (:class:`LossScaler`); on by default for fp16 autocast,
    and :func:`training_options` also turns it on for a UNet stored in fp16.
    """

    def __init__(
        self, dtype: torch.dtype | None, device: torch.device, *, scaling: bool | None = None
    ) -> None:
        self.dtype, self.device = dtype, device
        if scaling is None:
            scaling = dtype == torch.float16
        self.scaler = LossScaler() if scaling else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward of ``loss`` (scaled); the gradients left are the true, unscaled ones."""
        if self.scaler is None:
            loss.backward()
            return
        (loss.float() * self.scaler.scale).backward()
        self.scaler.unscale([p for g in optimizer.param_groups for p in g["params"]])

    def step(self, optimizer: torch.optim.Optimizer, *, zero: bool = False) -> None:
        """The optimizer step of a finite step; ``zero``: its gradients were all zero."""
        optimizer.step()
        if self.scaler is not None:
            self.scaler.stepped(zero)

    def skip(self, loss: torch.Tensor) -> bool:
        """A non-finite step is skipped. True when the loss scaler absorbs it — the loss was
        finite, only the scaled gradients overflowed, and the scale falls — so it does not
        count towards divergence."""
        if self.scaler is None or not bool(torch.isfinite(loss.detach()).all()):
            return False
        return self.scaler.overflow()


# Consecutive steps with all-zero gradients after which training stops (TrainingDiverged):
# nothing can be learned (fp16 underflow the loss scale could not fix, or offsets that
# do not reach the loss). A shorter run whose every step is zero stops at its last step.
ZERO_GRAD_STEPS = 8


def all_zero(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is exactly zero (None-only counts as zero); one sync."""
    if not grads:
        return True
    return not bool(torch.stack([g.detach().abs().amax().float() for g in grads]).amax() > 0)


class ZeroGradients:
    """Counts steps whose gradients are all zero; raises :class:`TrainingDiverged` rather
    than let a run finish "successfully" having learned nothing."""

    def __init__(self, steps: int, limit: int = ZERO_GRAD_STEPS) -> None:
        self.limit = max(1, min(limit, steps))
        self.run = 0

    def check(self, grads: list[torch.Tensor], step: int) -> bool:
        """True if this step's gradients are all zero; raises at :attr:`limit` in a row."""
        zero = all_zero(grads)
        self.run = self.run + 1 if zero else 0
        if self.run >= self.limit:
            raise TrainingDiverged(
                f"training stopped: the gradients were zero for {self.run} steps in a row "
                f"(by step {step}), so nothing is being learned (fp16 weights can flush them "
                "to zero: train on bf16 or fp32 weights if you can). Nothing was written."
            )
        return zero


NO_PRECISION = Precision(None, torch.device("cpu"))


@contextlib.contextmanager
def training_options(
    unet: nn.Module,
    device: torch.device,
    family: str,
    precision: str,
    checkpointing: str,
    *,
    compute_dtype: torch.dtype | None = None,
) -> Iterator[Precision]:
    """Enter the run's options; yields the :class:`Precision` for ``run_steps``.

    ``compute_dtype``: the host's compute dtype (``host.dtype``). A1111 can keep fp32
    weights and still run the UNet in fp16 under its own autocast; the weights' dtype
    alone would then train unscaled (and ``auto`` would stack a second autocast on it).
    """
    check_options(precision, checkpointing)
    weights = next(unet.parameters()).dtype
    host = compute_dtype if compute_dtype in (torch.float16, torch.bfloat16) else weights
    dtype = autocast_dtype(precision, device, host)
    scaling = needs_loss_scaling(dtype, unet, compute_dtype)
    with contextlib.ExitStack() as stack:
        if use_checkpointing(checkpointing, device, family):
            stack.enter_context(gradient_checkpointing(unet))
        yield Precision(dtype, device, scaling=scaling)
