"""Which Linear layers OSTAF trains: attention projections of the encoder or decoder blocks.

An attribute selects a UNet part (shape → encoder / down blocks; appearance and style → decoder /
up blocks), optionally plus the mid block. Experts may instead name the blocks explicitly, in
canonical (diffusers) form, whatever the UNet's own layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lib_ostaf.errors import IncompatibleModelError, InputError
from lib_ostaf.files.naming import (
    ATTN_NAMES,
    PROJ_NAMES,
    UNetInfo,
    block_part,
    block_sort_key,
    inspect_unet,
    is_linear_like,
    kohya_name,
    split_block,
)

ATTRIBUTE_PART = {"shape": "encoder", "appearance": "decoder", "style": "decoder"}
PARTS = ("encoder", "mid", "decoder")
_PROJ_ALIASES = {"to_out": "to_out.0"}
_CANONICAL_BLOCK = re.compile(
    r"^(down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+|up_blocks\.\d+\.attentions\.\d+)$"
)
_PROJ_REST = re.compile(
    r"^transformer_blocks\.\d+\.(?P<attn>attn[12])\.(?P<proj>to_q|to_k|to_v|to_out\.0)$"
)


def _choices(name: str, values: object, valid: tuple[str, ...]) -> tuple[str, ...]:
    """Validate a non-empty selection (str or iterable of str); dedupe keeping order."""
    items = (values,) if isinstance(values, str) else tuple(values)  # type: ignore[arg-type]
    if not items:
        raise InputError(f"{name} must not be empty; valid: {', '.join(valid)}")
    if name == "proj":
        items = tuple(_PROJ_ALIASES.get(v, v) for v in items)
    bad = [v for v in items if v not in valid]
    if bad:
        raise InputError(f"unknown {name} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    return tuple(dict.fromkeys(items))


@dataclass
class TargetSpec:
    """What to train. ``blocks`` (canonical diffusers block ids) overrides the attribute's part."""

    attribute: str
    include_mid: bool = False
    attn: tuple[str, ...] = ATTN_NAMES
    proj: tuple[str, ...] = PROJ_NAMES
    blocks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.attribute not in ATTRIBUTE_PART:
            raise InputError(
                f"unknown attribute {self.attribute!r}; valid: {', '.join(ATTRIBUTE_PART)}"
            )
        self.attn = _choices("attn", self.attn, ATTN_NAMES)
        self.proj = _choices("proj", self.proj, PROJ_NAMES)
        if self.blocks is not None:
            blocks = (self.blocks,) if isinstance(self.blocks, str) else tuple(self.blocks)
            bad = [b for b in blocks if not isinstance(b, str) or not _CANONICAL_BLOCK.match(b)]
            if bad or not blocks:
                raise InputError(
                    f"bad blocks {bad or '(empty)'}: give block ids in diffusers form, e.g. "
                    "'down_blocks.1.attentions.0', 'mid_block.attentions.0', "
                    "'up_blocks.1.attentions.2'"
                )
            self.blocks = tuple(dict.fromkeys(blocks))

    @property
    def part(self) -> str:
        return ATTRIBUTE_PART[self.attribute]


@dataclass(frozen=True)
class Target:
    """One trainable Linear layer."""

    name: str  # module path in the UNet's own layout
    kohya: str  # kohya module key (lora_unet_…)
    part: str  # "encoder" | "mid" | "decoder"
    block: str  # canonical (diffusers) block id
    attn: str  # "attn1" | "attn2"
    proj: str  # "to_q" | "to_k" | "to_v" | "to_out.0"
    in_features: int
    out_features: int


def find_module(unet: nn.Module, name: str) -> nn.Module:
    """``unet``'s submodule at ``name``; IncompatibleModelError if it has none."""
    try:
        return unet.get_submodule(name)
    except AttributeError as e:
        raise IncompatibleModelError(f"the UNet has no module {name!r}") from e


def available_blocks(unet: nn.Module, info: UNetInfo | None = None) -> list[str]:
    """Canonical ids of the UNet's attention blocks, in forward order."""
    return list(_info(unet, info).attention_blocks)


def _info(unet: nn.Module, info: UNetInfo | None) -> UNetInfo:
    # a hand-built info may lack the block list; the UNet itself has it
    return info if info is not None and info.attention_blocks else inspect_unet(unet)


def block_level(block: str, n_levels: int) -> int:
    """Resolution level of a canonical block id: 0 = full latent resolution, +1 per halving."""
    kind, level, _ = block_sort_key(block)
    return (n_levels - 1) if kind == 1 else level if kind == 0 else n_levels - 1 - level


def default_blocks(
    unet: nn.Module, attribute: str, info: UNetInfo | None = None
) -> tuple[str, ...]:
    """The attention blocks an attribute trains by default, chosen by resolution level.

    * shape → the bottleneck: the lowest-resolution level that has attention, on both
      sides (the encoder's last attention blocks, the mid block, the decoder's first);
    * appearance / style → the decoder's attention blocks above that level (the higher
      resolutions). Measured in bench/ (docs/results.md); reasons in docs/method.md.

    ``attribute`` may also be a part ("encoder", "mid", "decoder") for all its blocks.
    """
    info = _info(unet, info)
    blocks = available_blocks(unet, info)
    if attribute in PARTS:
        return tuple(b for b in blocks if block_part(b) == attribute)
    if attribute not in ATTRIBUTE_PART:
        raise InputError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTE_PART)}")
    levels = {b: block_level(b, info.num_levels) for b in blocks}
    bottleneck = max(lv for b, lv in levels.items() if block_part(b) == "encoder")
    if attribute == "shape":
        return tuple(b for b in blocks if levels[b] >= bottleneck)
    return tuple(b for b in blocks if block_part(b) == "decoder" and levels[b] < bottleneck)


def select_targets(unet: nn.Module, spec: TargetSpec, info: UNetInfo | None = None) -> list[Target]:
    """The ``nn.Linear`` attention projections ``spec`` selects, in forward order."""
    info = _info(unet, info)
    available = available_blocks(unet, info)
    if spec.blocks is not None:
        unknown = [b for b in spec.blocks if b not in available]
        if unknown:
            raise InputError(
                f"this {info.family} UNet has no attention block {', '.join(unknown)}; "
                f"valid: {', '.join(available)}"
            )
        wanted = set(spec.blocks)
    else:
        wanted = set(default_blocks(unet, spec.attribute, info))
        wanted |= {b for b in available if spec.include_mid and block_part(b) == "mid"}

    found: list[Target] = []
    skipped = 0  # matching names that are not Linear (e.g. wrapped by someone else)
    for name, mod in unet.named_modules():
        try:
            block, rest = split_block(name, info)
        except InputError:
            continue
        m = _PROJ_REST.match(rest)
        if m is None or block not in wanted:
            continue
        if m["attn"] not in spec.attn or m["proj"] not in spec.proj:
            continue
        if not is_linear_like(mod):
            skipped += 1
            continue
        found.append(
            Target(
                name=name,
                kohya=kohya_name(name, info),
                part=block_part(block),
                block=block,
                attn=m["attn"],
                proj=m["proj"],
                in_features=mod.in_features,
                out_features=mod.out_features,
            )
        )
    if not found:
        what = f"blocks {list(spec.blocks)}" if spec.blocks else f"the {spec.part}"
        extra = f" ({skipped} matching layers are not nn.Linear)" if skipped else ""
        raise InputError(
            f"nothing to train: no Linear {'/'.join(spec.attn)} {'/'.join(spec.proj)} "
            f"projections in {what} of this {info.family} UNet{extra}"
        )
    # named_modules order differs by layout (diffusers registers up_blocks before mid_block);
    # sort stably by forward block order so both layouts give the same sequence.
    found.sort(key=lambda t: block_sort_key(t.block))
    return found
