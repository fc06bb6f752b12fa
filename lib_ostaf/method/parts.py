"""An adapter's parts: which attribute each of its modules carries, and each part's λ.

A file trained for one attribute has one part. ``--attribute shape+appearance`` trains
both from one image into one kohya file (a plain LoRA to every other tool); the metadata
``ostaf.parts`` = ``{"shape": [kohya keys], "appearance": [...]}`` records the split, so a
prompt can weigh the parts apart: ``W + Σ_part λ_part·ΔW_part``, merged once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from lib_ostaf.files.adapter_file import AdapterFile, LoraModule
from lib_ostaf.method.augment import ATTRIBUTES

PARTS_KEY = "ostaf.parts"
PART_SEPARATOR = "+"
TOKEN_PARTS = ("appearance", "style")  # the parts that learn the placeholder's vector


def attribute_parts(attribute: str) -> tuple[str, ...]:
    """``"shape+appearance"`` → ``("shape", "appearance")``; one attribute → itself."""
    return tuple(attribute.split(PART_SEPARATOR))


def module_parts(adapter: AdapterFile) -> dict[str, str]:
    """kohya module key → part. From ``ostaf.parts``; a one-attribute file written before
    parts existed is all ``ostaf.attribute``; a plain LoRA has no parts (``{}``)."""
    raw = adapter.metadata.get(PARTS_KEY)
    if raw:
        try:
            table = json.loads(raw)
        except ValueError:
            table = None
        if isinstance(table, dict):
            return {
                str(key): str(part)
                for part, keys in table.items()
                if isinstance(keys, list)
                for key in keys
                if key in adapter.modules
            }
    attribute = adapter.metadata.get("ostaf.attribute", "")
    if attribute in ATTRIBUTES:
        return dict.fromkeys(adapter.modules, attribute)
    return {}


def part_names(adapter: AdapterFile) -> tuple[str, ...]:
    """The adapter's parts, in the order the file lists them."""
    return tuple(dict.fromkeys(module_parts(adapter).values()))


def parts_table(parts: Mapping[str, str]) -> dict[str, list[str]]:
    """``{kohya key: part}`` → the ``ostaf.parts`` table ``{part: [keys, sorted]}``."""
    table: dict[str, list[str]] = {}
    for key, part in parts.items():
        table.setdefault(part, []).append(key)
    return {part: sorted(keys) for part, keys in table.items()}


def split_by_part(
    adapter: AdapterFile, weights: Mapping[str, float], default: float
) -> list[tuple[str, dict[str, LoraModule], float]]:
    """The adapter's modules grouped by part, each with its λ (``weights[part]``, else
    ``default``). Modules of no recorded part form the group ``""`` at ``default``."""
    parts = module_parts(adapter)
    groups: dict[str, dict[str, LoraModule]] = {}
    for key, module in adapter.modules.items():
        groups.setdefault(parts.get(key, ""), {})[key] = module
    return [(part, mods, float(weights.get(part, default))) for part, mods in groups.items()]


def token_weight(adapter: AdapterFile, weight: float, part_weights: Mapping[str, float]) -> float:
    """λ of an attribute's learned token: its appearance or style part's λ, else the file's
    (a shape part learns no token)."""
    names = part_names(adapter)
    part = next((p for p in TOKEN_PARTS if p in names), None)
    return weight if part is None else float(part_weights.get(part, weight))
