"""UNet inspection and module-name mapping: diffusers ↔ ldm/sgm layouts, kohya LoRA keys.

Two module layouts exist for the same SD UNet:

* diffusers: ``down_blocks.i.attentions.j``, ``mid_block.attentions.0``,
  ``up_blocks.i.attentions.j``
* ldm / sgm (A1111, Forge): ``input_blocks.(1 + i(L+1) + j).1``, ``middle_block.1``,
  ``output_blocks.(i(L+1) + j).1`` where L = layers_per_block (resnets per down level).

Inside an attention block (a spatial transformer) the paths are identical in both layouts, e.g.
``transformer_blocks.0.attn2.to_k``. Only attention blocks are mapped here; that is all OSTAF
trains. The canonical block id used across the package is the diffusers one.

Kohya keys are ``lora_unet_`` + module path with '.' → '_'; SD1/SD2 files use diffusers paths,
SDXL files use ldm/sgm paths.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lib_ostaf.errors import IncompatibleModelError, InputError

FAMILIES = ("sd1", "sd2", "sdxl")
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}  # the families' training sizes
LAYOUTS = ("diffusers", "ldm")
KOHYA_PREFIX = "lora_unet_"

_N = r"(0|[1-9][0-9]*)"  # a module index, no leading zeros (keeps mappings bijective)
# Attention-block prefixes, per layout.
_DIFFUSERS_BLOCK = re.compile(
    rf"^(?P<block>down_blocks\.{_N}\.attentions\.{_N}|mid_block\.attentions\.{_N}"
    rf"|up_blocks\.{_N}\.attentions\.{_N})(?:\.(?P<rest>.+))?$"
)
_LDM_BLOCK = re.compile(
    rf"^(?P<block>input_blocks\.{_N}\.1|middle_block\.1|output_blocks\.{_N}\.1)(?:\.(?P<rest>.+))?$"
)
_DOWN = re.compile(rf"^down_blocks\.{_N}\.attentions\.{_N}$")
_MID = re.compile(rf"^mid_block\.attentions\.{_N}$")
_UP = re.compile(rf"^up_blocks\.{_N}\.attentions\.{_N}$")
_INPUT = re.compile(rf"^input_blocks\.{_N}\.1$")
_OUTPUT = re.compile(rf"^output_blocks\.{_N}\.1$")

# Sub-paths inside a transformer block that kohya keys may name (all Linear / norm layers).
ATTN_NAMES = ("attn1", "attn2")
PROJ_NAMES = ("to_q", "to_k", "to_v", "to_out.0")
_INNER = (
    *(f"{a}.{p}" for a in ATTN_NAMES for p in PROJ_NAMES),
    *("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"),
)
_BLOCK_LEVEL = ("norm", "proj_in", "proj_out")  # direct children of the attention block
_INNER_FROM_KOHYA = {s.replace(".", "_"): s for s in _INNER}
_REST_DOTTED = re.compile(
    rf"^(?:{'|'.join(_BLOCK_LEVEL)}|transformer_blocks\.{_N}\."
    rf"(?:{'|'.join(re.escape(s) for s in _INNER)}))$"
)
_REST_KOHYA = re.compile(rf"^transformer_blocks_{_N}_({'|'.join(_INNER_FROM_KOHYA)})$")
# Kohya key bodies (after the prefix), both conventions: (pattern, dotted block prefix).
_KOHYA_BLOCKS = (
    (
        re.compile(rf"^down_blocks_{_N}_attentions_{_N}_(?P<rest>.+)$"),
        "down_blocks.{}.attentions.{}",
    ),
    (re.compile(rf"^mid_block_attentions_{_N}_(?P<rest>.+)$"), "mid_block.attentions.{}"),
    (re.compile(rf"^up_blocks_{_N}_attentions_{_N}_(?P<rest>.+)$"), "up_blocks.{}.attentions.{}"),
    (re.compile(rf"^input_blocks_{_N}_1_(?P<rest>.+)$"), "input_blocks.{}.1"),
    (re.compile(r"^middle_block_1_(?P<rest>.+)$"), "middle_block.1"),
    (re.compile(rf"^output_blocks_{_N}_1_(?P<rest>.+)$"), "output_blocks.{}.1"),
)


@dataclass(frozen=True)
class UNetInfo:
    """What naming needs to know about a UNet. Blocks are canonical (diffusers) ids."""

    family: str  # "sd1" | "sd2" | "sdxl"
    layout: str  # "diffusers" | "ldm" — the layout of the UNet's own module names
    layers_per_block: int  # resnets per down level (up levels have one more)
    context_dim: int  # cross-attention (text) dim
    num_levels: int  # resolution levels (len(block_out_channels) / len(channel_mult))
    # Canonical ids in forward order, and transformer_blocks per block. Empty = unknown (an info
    # built by hand): blocks are then only checked against layers_per_block / num_levels.
    attention_blocks: tuple[str, ...] = ()
    transformer_depths: tuple[int, ...] = ()

    def depth(self, block: str) -> int | None:
        """Transformer blocks in ``block`` (canonical id): 0 if it has none, None if unknown."""
        if self.attention_blocks:
            if block in self.attention_blocks:
                return self.transformer_depths[self.attention_blocks.index(block)]
            return 0
        try:
            part, i, j = block_sort_key(block)
        except InputError:
            return 0
        lpb = self.layers_per_block
        fits = j == 0 if part == 1 else i < self.num_levels and j < lpb + (part == 2)
        return None if fits else 0


# ---------------------------------------------------------------------------------------------
# Canonical block ids


_PART_OF = {"down_blocks.": "encoder", "mid_block.": "mid", "up_blocks.": "decoder"}


def block_part(block: str) -> str:
    """'encoder' | 'mid' | 'decoder' for a canonical (diffusers) block id."""
    for prefix, part in _PART_OF.items():
        if block.startswith(prefix):
            return part
    raise InputError(f"not a canonical attention block id: {block!r}")


def block_sort_key(block: str) -> tuple[int, int, int]:
    """Forward order of canonical block ids: encoder, mid, decoder; then level, index."""
    if m := _DOWN.match(block):
        return 0, int(m[1]), int(m[2])
    if m := _MID.match(block):
        return 1, 0, int(m[1])
    if m := _UP.match(block):
        return 2, int(m[1]), int(m[2])
    raise InputError(f"not a canonical attention block id: {block!r}")


def _ldm_block_to_canonical(block: str, lpb: int) -> str:
    """ldm attention block prefix → diffusers id, by index arithmetic only (no existence check)."""
    step = lpb + 1
    if m := _INPUT.match(block):
        n = int(m[1])
        if n == 0 or (n - 1) % step == lpb:  # conv_in / downsample slots hold no attention
            raise InputError(f"{block!r} is not an attention slot (layers_per_block={lpb})")
        return f"down_blocks.{(n - 1) // step}.attentions.{(n - 1) % step}"
    if block == "middle_block.1":
        return "mid_block.attentions.0"
    if m := _OUTPUT.match(block):
        n = int(m[1])
        return f"up_blocks.{n // step}.attentions.{n % step}"
    raise InputError(f"not an ldm attention block: {block!r}")


def _canonical_to_ldm_block(block: str, lpb: int) -> str:
    step = lpb + 1
    if m := _DOWN.match(block):
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1"
    if _MID.match(block):
        return "middle_block.1"
    if m := _UP.match(block):
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.1"
    raise InputError(f"not a diffusers attention block: {block!r}")


def _check_block(block: str, info: UNetInfo, name: str) -> None:
    if info.depth(block) == 0:
        known = f" (attention blocks: {', '.join(info.attention_blocks)})"
        raise InputError(
            f"{name!r} is not inside an attention block of this {info.family} UNet"
            + (known if info.attention_blocks else "")
        )


def split_block(name: str, info: UNetInfo, layout: str | None = None) -> tuple[str, str]:
    """Split a module path in ``layout`` (default: the UNet's own) into (canonical block, rest).

    ``rest`` is the path inside the attention block ('' for the block itself).
    """
    layout = layout or info.layout
    if layout == "diffusers":
        m = _DIFFUSERS_BLOCK.match(name)
        block = m["block"] if m else None
    elif layout == "ldm":
        m = _LDM_BLOCK.match(name)
        block = _ldm_block_to_canonical(m["block"], info.layers_per_block) if m else None
    else:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if m is None or block is None:
        raise InputError(f"{name!r} is not an attention-block module path in {layout} layout")
    _check_block(block, info, name)
    return block, m["rest"] or ""


def join_block(block: str, rest: str, info: UNetInfo, layout: str | None = None) -> str:
    """Inverse of ``split_block``: canonical block + rest → module path in ``layout``."""
    layout = layout or info.layout
    _check_block(block, info, block)
    if layout == "diffusers":
        prefix = block
    elif layout == "ldm":
        prefix = _canonical_to_ldm_block(block, info.layers_per_block)
    else:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return f"{prefix}.{rest}" if rest else prefix


def ldm_to_diffusers(name: str, info: UNetInfo) -> str:
    """ldm/sgm attention-block module path → diffusers path (rest unchanged)."""
    return join_block(*split_block(name, info, "ldm"), info, "diffusers")


def diffusers_to_ldm(name: str, info: UNetInfo) -> str:
    """diffusers attention-block module path → ldm/sgm path (rest unchanged)."""
    return join_block(*split_block(name, info, "diffusers"), info, "ldm")


# ---------------------------------------------------------------------------------------------
# Kohya keys


def kohya_convention(info: UNetInfo) -> str:
    """Layout whose names kohya files of this family use: SDXL → 'ldm', SD1/SD2 → 'diffusers'."""
    return "ldm" if info.family == "sdxl" else "diffusers"


def kohya_name(module_name: str, info: UNetInfo) -> str:
    """Module path in the UNet's own layout → kohya module key (``lora_unet_…``)."""
    block, rest = split_block(module_name, info)
    if not _REST_DOTTED.match(rest):
        raise InputError(f"{module_name!r} is not a layer kohya keys can name")
    path = join_block(block, rest, info, kohya_convention(info))
    return KOHYA_PREFIX + path.replace(".", "_")


def module_name_from_kohya(
    key: str, info: UNetInfo, module_names: Collection[str] | None = None
) -> str:
    """Kohya key → module path in the UNet's own layout.

    Accepts diffusers- and ldm-named keys for every family, and full tensor keys
    (``….lora_down.weight``, ``….alpha``: everything after the first '.' is ignored).
    If ``module_names`` (e.g. ``dict(unet.named_modules())``) is given, the result must be in it.
    Raises IncompatibleModelError for keys that do not fit this UNet.
    """
    mod_key = key.split(".", 1)[0]
    if not mod_key.startswith(KOHYA_PREFIX):
        what = "a text-encoder key" if mod_key.startswith("lora_te") else "not a kohya UNet key"
        raise IncompatibleModelError(f"{key!r}: {what}; expected '{KOHYA_PREFIX}…'")
    body = mod_key[len(KOHYA_PREFIX) :]
    for pattern, template in _KOHYA_BLOCKS:
        if m := pattern.match(body):
            prefix = template.format(*m.groups()[:-1])
            tail = m["rest"]
            break
    else:
        raise IncompatibleModelError(f"{key!r} does not name a layer inside an attention block")
    # '_' → '.' is ambiguous (to_out_0, transformer_blocks): match the known sub-paths instead
    if r := _REST_KOHYA.match(tail):
        rest, k = f"transformer_blocks.{r[1]}.{_INNER_FROM_KOHYA[r[2]]}", int(r[1])
    elif tail in _BLOCK_LEVEL:
        rest, k = tail, 0
    else:
        raise IncompatibleModelError(f"{key!r}: unknown layer {tail!r} inside an attention block")
    try:
        block = (
            _ldm_block_to_canonical(prefix, info.layers_per_block)
            if prefix.startswith(("input_blocks", "middle_block", "output_blocks"))
            else prefix
        )
        depth = info.depth(block)
    except InputError as e:
        raise IncompatibleModelError(f"{key!r} does not fit this UNet: {e}") from e
    if depth == 0 or (depth is not None and k >= depth):
        where = block if depth == 0 else f"{block}.transformer_blocks.{k}"
        raise IncompatibleModelError(
            f"{key!r} names {where}, which this {info.family} UNet does not have"
        )
    name = join_block(block, rest, info)
    if module_names is not None and name not in module_names:
        raise IncompatibleModelError(f"{key!r} → {name!r}, which this UNet does not have")
    return name


# ---------------------------------------------------------------------------------------------
# Inspection


def _config(unet: nn.Module, key: str) -> object:
    cfg = getattr(unet, "config", None)
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def is_linear_like(m: object) -> bool:
    """``m`` computes ``x @ Wᵀ + b``: a ``torch.nn.Linear``, or a WebUI's own class with
    ``in_features``/``out_features`` and a 2-D ``weight`` (Forge's ``ForgeOperations.Linear``
    is a plain ``nn.Module``, research/webui_api.md §8.1)."""
    if isinstance(m, nn.Linear):
        return True
    weight = getattr(m, "weight", None)
    return (
        isinstance(m, nn.Module)
        and isinstance(getattr(m, "in_features", None), int)
        and isinstance(getattr(m, "out_features", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def _is_linear(m: nn.Module | None) -> bool:
    # WebUIs and PEFT may wrap layers; look through a ``base_layer``.
    return is_linear_like(m) or is_linear_like(getattr(m, "base_layer", None))


def _ldm_levels(unet: nn.Module) -> tuple[int, int]:
    """(layers_per_block, num_levels) of an ldm/sgm UNet."""
    nrb = getattr(unet, "num_res_blocks", None)
    mult = getattr(unet, "channel_mult", None)
    if nrb is not None and mult is not None:
        counts = {int(nrb)} if isinstance(nrb, int) else {int(x) for x in nrb}
        if len(counts) != 1:
            raise IncompatibleModelError(f"unsupported UNet: per-level num_res_blocks {nrb}")
        return counts.pop(), len(mult)
    # Duck-typed fallback: the first downsample slot (a lone Downsample / down-ResBlock) sits at
    # input_blocks[L + 1].
    blocks = list(unet.input_blocks)
    for i, b in enumerate(blocks[1:], start=1):
        first = next(iter(b.children()), None)
        if hasattr(first, "op") or getattr(first, "down", False):
            return i - 1, len(blocks) // i
    return len(blocks) - 1, 1


def inspect_unet(unet: nn.Module) -> UNetInfo:
    """Family, layout and block structure of a diffusers or ldm/sgm SD UNet (any size)."""
    if not isinstance(unet, nn.Module):
        raise IncompatibleModelError(f"expected a torch UNet module, got {type(unet).__name__}")
    layout, lpb, num_levels = _layout_and_levels(unet)
    depths, proj_in, context_dim = _scan_attention(unet, layout, lpb)
    if not depths or not context_dim:
        raise IncompatibleModelError(
            f"{type(unet).__name__} has no cross-attention transformer blocks; "
            "not a text-conditioned Stable Diffusion UNet"
        )
    blocks = sorted(depths, key=block_sort_key)
    shape = UNetInfo("", layout, lpb, context_dim, num_levels)  # structure only
    if bad := [b for b in blocks if shape.depth(b) == 0]:
        raise IncompatibleModelError(f"unsupported UNet layout: unexpected blocks {bad}")
    family = "sdxl" if _is_xl(unet, layout) else ("sd2" if _is_linear(proj_in) else "sd1")
    return UNetInfo(
        family=family,
        layout=layout,
        layers_per_block=lpb,
        context_dim=context_dim,
        num_levels=num_levels,
        attention_blocks=tuple(blocks),
        transformer_depths=tuple(depths[b] for b in blocks),
    )


def _layout_and_levels(unet: nn.Module) -> tuple[str, int, int]:
    """(layout, layers_per_block, num_levels) of a diffusers or ldm/sgm UNet."""
    if all(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        layout = "diffusers"
        num_levels = len(unet.down_blocks)
        down = {len(getattr(b, "resnets", ())) for b in unet.down_blocks}
        up = {len(getattr(b, "resnets", ())) for b in unet.up_blocks}
        if len(down) != 1 or len(up) != 1 or up != {next(iter(down)) + 1}:
            raise IncompatibleModelError(
                f"unsupported UNet: resnets per down level {sorted(down)}, "
                f"per up level {sorted(up)}"
            )
        lpb = down.pop()
    elif all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        layout = "ldm"
        lpb, num_levels = _ldm_levels(unet)
        expected = num_levels * (lpb + 1)
        if len(unet.input_blocks) != expected or len(unet.output_blocks) != expected:
            raise IncompatibleModelError(
                f"unsupported UNet: {len(unet.input_blocks)} input / {len(unet.output_blocks)} "
                f"output blocks for {num_levels} levels × {lpb} layers"
            )
    else:
        raise IncompatibleModelError(
            f"{type(unet).__name__} is not a Stable Diffusion UNet (expected diffusers "
            "down_blocks/mid_block/up_blocks or ldm input_blocks/middle_block/output_blocks)"
        )
    if lpb < 1:
        raise IncompatibleModelError("unsupported UNet: no resnets per level")
    return layout, lpb, num_levels


def _scan_attention(
    unet: nn.Module, layout: str, lpb: int
) -> tuple[dict[str, int], nn.Module | None, int]:
    """(transformer blocks per canonical attention block, first proj_in, cross-attention dim)."""
    block_re = _DIFFUSERS_BLOCK if layout == "diffusers" else _LDM_BLOCK
    depths: dict[str, int] = {}
    proj_in: nn.Module | None = None
    context_dim = 0
    tb = re.compile(r"^transformer_blocks\.(\d+)$")
    for name, mod in unet.named_modules():
        m = block_re.match(name)
        if m is None:
            continue
        rest = m["rest"] or ""
        try:
            block = (
                m["block"] if layout == "diffusers" else _ldm_block_to_canonical(m["block"], lpb)
            )
        except InputError as e:
            raise IncompatibleModelError(f"unsupported UNet layout: {e}") from e
        if t := tb.match(rest):
            depths[block] = max(depths.get(block, 0), int(t[1]) + 1)
        elif rest == "proj_in" and proj_in is None:
            proj_in = mod
        elif rest.endswith("attn2.to_k") and not context_dim:
            lin = mod if is_linear_like(mod) else getattr(mod, "base_layer", None)
            context_dim = int(getattr(lin, "in_features", 0))
    return depths, proj_in, context_dim


def _is_xl(unet: nn.Module, layout: str) -> bool:
    """The UNet takes SDXL's extra conditioning (pooled text + size/crop embeddings)."""
    if layout == "diffusers":
        return _config(unet, "addition_embed_type") == "text_time" or (
            hasattr(unet, "add_embedding") and hasattr(unet, "add_time_proj")
        )
    num_classes = getattr(unet, "num_classes", None)
    return (
        num_classes == "sequential"
        or getattr(unet, "adm_in_channels", None) is not None
        or (hasattr(unet, "label_emb") and not isinstance(num_classes, int))
    )
