"""From an adapter file to the offsets of one loaded UNet (names mapped, family checked)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from torch import nn

from lib_ostaf.errors import IncompatibleModelError
from lib_ostaf.files.adapter_file import AdapterFile, LoraModule
from lib_ostaf.files.metadata import sd_version_label
from lib_ostaf.files.naming import UNetInfo, module_name_from_kohya
from lib_ostaf.method.parts import split_by_part

UNET_PREFIX = "lora_unet_"


def unet_deltas(
    adapter: AdapterFile,
    unet: nn.Module,
    info: UNetInfo,
    modules: Mapping[str, LoraModule] | None = None,
) -> dict[str, torch.Tensor]:
    """``{module name in this UNet: float32 ΔW}`` for the adapter's UNet layers (only
    ``modules``, a subset of the file's, when given: one part)."""
    family = adapter.family
    if family is not None and family != info.family:
        raise IncompatibleModelError(
            f"{adapter.name} was made for {sd_version_label(family)} models; "
            f"the loaded model is {sd_version_label(info.family)}"
        )
    deltas: dict[str, torch.Tensor] = {}
    for key, module in (adapter.modules if modules is None else modules).items():
        if key.startswith(UNET_PREFIX):
            deltas[module_name_from_kohya(key, info)] = module.delta()
    if not deltas:
        raise IncompatibleModelError(f"{adapter.name} has no UNet layers to apply")
    return deltas


def merge_terms(
    adapter: AdapterFile,
    unet: nn.Module,
    info: UNetInfo,
    weight: float,
    part_weights: Mapping[str, float] | None = None,
) -> list[tuple[Hashable, dict[str, torch.Tensor], float]]:
    """``WeightPatcher`` terms for one adapter: one ``(identity, ΔW, λ)`` for the whole
    file, or one per part when ``part_weights`` weighs a part apart from ``weight``."""
    groups = split_by_part(adapter, part_weights or {}, weight)
    if all(lam == weight for _, _, lam in groups):
        return [(adapter.identity, unet_deltas(adapter, unet, info), weight)]
    return [
        ((*adapter.identity, part), unet_deltas(adapter, unet, info, mods), lam)
        for part, mods, lam in groups
        if any(k.startswith(UNET_PREFIX) for k in mods)
    ]
