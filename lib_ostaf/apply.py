"""From an adapter file to the offsets of one loaded UNet (names mapped, family checked)."""

from __future__ import annotations

import torch
from torch import nn

from .adapter_file import AdapterFile, sd_version_label
from .errors import IncompatibleModelError
from .naming import UNetInfo, module_name_from_kohya

UNET_PREFIX = "lora_unet_"


def unet_deltas(adapter: AdapterFile, unet: nn.Module, info: UNetInfo) -> dict[str, torch.Tensor]:
    """``{module name in this UNet: float32 ΔW}`` for the adapter's UNet layers."""
    family = adapter.family
    if family is not None and family != info.family:
        raise IncompatibleModelError(
            f"{adapter.name} was made for {sd_version_label(family)} models; "
            f"the loaded model is {sd_version_label(info.family)}"
        )
    deltas: dict[str, torch.Tensor] = {}
    for key, module in adapter.modules.items():
        if key.startswith(UNET_PREFIX):
            deltas[module_name_from_kohya(key, info)] = module.delta()
    if not deltas:
        raise IncompatibleModelError(f"{adapter.name} has no UNet layers to apply")
    return deltas
