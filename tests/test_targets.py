"""Selection of the Linear layers OSTAF trains, on tiny SD1/SD2/SDXL UNets in both layouts."""

from __future__ import annotations

import functools
import re

import pytest
from torch import nn

from lib_ostaf.errors import IncompatibleModelError, InputError
from lib_ostaf.files.naming import (
    block_part,
    inspect_unet,
    ldm_to_diffusers,
    module_name_from_kohya,
)
from lib_ostaf.method.targets import (
    ATTRIBUTE_PART,
    PARTS,
    Target,
    TargetSpec,
    available_blocks,
    default_blocks,
    find_module,
    select_targets,
)
from tests.unets import CHANNELS, CONTEXT_DIM, FAMILIES, tiny_diffusers_unet, tiny_ldm_unet

LAYOUTS = ("diffusers", "ldm")
# Transformer blocks per part with layers_per_block=2 (tests/unets.py); 8 projections each.
TRANSFORMERS = {
    "sd1": {"encoder": 4, "mid": 1, "decoder": 6},
    "sd2": {"encoder": 4, "mid": 1, "decoder": 6},
    "sdxl": {"encoder": 2 * 1 + 2 * 2, "mid": 2, "decoder": 3 * 2 + 3 * 1},
}
BLOCKS = {
    "sd1": [
        "down_blocks.0.attentions.0",
        "down_blocks.0.attentions.1",
        "down_blocks.1.attentions.0",
        "down_blocks.1.attentions.1",
        "mid_block.attentions.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
        "up_blocks.2.attentions.0",
        "up_blocks.2.attentions.1",
        "up_blocks.2.attentions.2",
    ],
    "sdxl": [
        "down_blocks.1.attentions.0",
        "down_blocks.1.attentions.1",
        "down_blocks.2.attentions.0",
        "down_blocks.2.attentions.1",
        "mid_block.attentions.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
        "up_blocks.0.attentions.2",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
    ],
}
BLOCKS["sd2"] = BLOCKS["sd1"]


@functools.cache
def unet(family: str, layout: str) -> nn.Module:
    """Cached tiny UNet; tests that modify a UNet build their own."""
    return (tiny_diffusers_unet if layout == "diffusers" else tiny_ldm_unet)(family)


def select(family: str, layout: str, **spec: object) -> list[Target]:
    return select_targets(unet(family, layout), TargetSpec(**spec))  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_available_blocks(family: str, layout: str) -> None:
    model = unet(family, layout)
    assert available_blocks(model) == BLOCKS[family]
    assert available_blocks(model, inspect_unet(model)) == BLOCKS[family]


# The defaults by resolution level: shape = the bottleneck (the encoder's lowest-resolution
# attention level, the mid block, the decoder's blocks at that level); appearance / style =
# the decoder's higher-resolution attention blocks. In BLOCKS' order (2 + 2 encoder blocks,
# mid, 3 + 3 decoder blocks): shape = blocks 2 to 7, appearance = the last 3.
DEFAULT_BLOCKS = {
    family: {"shape": blocks[2:8], "appearance": blocks[8:]} for family, blocks in BLOCKS.items()
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_default_blocks_by_resolution_level(family: str, layout: str) -> None:
    model = unet(family, layout)
    info = inspect_unet(model)
    enc = select(family, layout, attribute="shape")
    dec = select(family, layout, attribute="appearance")
    assert list(dict.fromkeys(t.block for t in enc)) == DEFAULT_BLOCKS[family]["shape"]
    assert list(dict.fromkeys(t.block for t in dec)) == DEFAULT_BLOCKS[family]["appearance"]
    assert {t.block for t in enc}.isdisjoint(t.block for t in dec)
    assert {t.part for t in dec} == {"decoder"}
    assert {t.part for t in enc} == {"encoder", "mid", "decoder"}
    for part in PARTS:  # a part name selects all its blocks
        assert all(block_part(b) == part for b in default_blocks(model, part))
    enc_prefix, dec_prefix = (
        ("down_blocks.", "up_blocks.")
        if layout == "diffusers"
        else ("input_blocks.", "output_blocks.")
    )
    assert all(t.name.startswith(dec_prefix) and t.block.startswith("up_blocks.") for t in dec)
    assert any(t.name.startswith(enc_prefix) for t in enc)
    assert select(family, layout, attribute="style") == dec
    with_mid = select(family, layout, attribute="style", include_mid=True)
    mid = [t for t in with_mid if t.part == "mid"]
    assert len(mid) == TRANSFORMERS[family]["mid"] * 8 and with_mid == mid + dec
    assert all(t.name.startswith(("mid_block.", "middle_block.1.")) for t in mid)
    for t in enc + with_mid:
        module = find_module(model, t.name)
        assert isinstance(module, nn.Linear)
        assert (t.in_features, t.out_features) == (module.in_features, module.out_features)
        assert module_name_from_kohya(t.kohya, info) == t.name
    assert len({t.name for t in enc + dec}) == len(enc) + len(dec)


@pytest.mark.parametrize("attribute", list(ATTRIBUTE_PART))
@pytest.mark.parametrize("family", FAMILIES)
def test_same_targets_in_both_layouts(family: str, attribute: str) -> None:
    d = select(family, "diffusers", attribute=attribute, include_mid=True)
    m = select(family, "ldm", attribute=attribute, include_mid=True)
    info = inspect_unet(unet(family, "ldm"))
    assert [t.kohya for t in d] == [t.kohya for t in m]
    assert [ldm_to_diffusers(t.name, info) for t in m] == [t.name for t in d]
    strip = [(t.part, t.block, t.attn, t.proj, t.in_features, t.out_features) for t in d]
    assert strip == [(t.part, t.block, t.attn, t.proj, t.in_features, t.out_features) for t in m]
    # deterministic
    assert select(family, "ldm", attribute=attribute, include_mid=True) == m


def test_order_is_forward_order_within_blocks() -> None:
    targets = select("sdxl", "diffusers", attribute="shape")
    first_block = [t for t in targets if t.block == "down_blocks.2.attentions.0"]
    assert [t.name.split("attentions.0.")[1] for t in first_block[:5]] == [
        "transformer_blocks.0.attn1.to_q",
        "transformer_blocks.0.attn1.to_k",
        "transformer_blocks.0.attn1.to_v",
        "transformer_blocks.0.attn1.to_out.0",
        "transformer_blocks.0.attn2.to_q",
    ]
    assert first_block[8].name.endswith("transformer_blocks.1.attn1.to_q")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_attn_and_proj_filters(family: str, layout: str) -> None:
    n = len(select(family, layout, attribute="style")) // 8  # transformer blocks
    kv = select(family, layout, attribute="style", attn=("attn2",), proj=("to_k", "to_v"))
    assert len(kv) == 2 * n
    assert {(t.attn, t.proj) for t in kv} == {("attn2", "to_k"), ("attn2", "to_v")}
    assert {t.in_features for t in kv} == {CONTEXT_DIM}  # cross-attention reads the text
    assert {t.out_features for t in kv} <= set(CHANNELS)
    out = select(family, layout, attribute="style", attn="attn1", proj=["to_out"])  # aliases
    assert len(out) == n and {(t.attn, t.proj) for t in out} == {("attn1", "to_out.0")}
    assert all(t.name.endswith("attn1.to_out.0") for t in out)
    q = select(family, layout, attribute="shape", proj=("to_q",))
    assert len(q) == 2 * len(select(family, layout, attribute="shape")) // 8
    assert all(t.in_features == t.out_features for t in q)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_override(layout: str) -> None:
    blocks = ("up_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0")
    spec = TargetSpec("shape", blocks=blocks)  # override replaces the encoder default
    assert spec.blocks == ("up_blocks.1.attentions.0", "mid_block.attentions.0")
    targets = select_targets(unet("sdxl", layout), spec)
    assert [t.block for t in targets] == ["mid_block.attentions.0"] * 16 + [
        "up_blocks.1.attentions.0"
    ] * 8
    assert [t.part for t in targets[::8]] == ["mid", "mid", "decoder"]
    if layout == "ldm":
        assert targets[0].name.startswith("middle_block.1.transformer_blocks.0.")
        assert targets[-1].name == "output_blocks.3.1.transformer_blocks.0.attn2.to_out.0"
    one = select(
        "sd1", layout, attribute="style", blocks=["down_blocks.1.attentions.1"], proj="to_v"
    )
    assert [(t.block, t.attn, t.proj) for t in one] == [
        ("down_blocks.1.attentions.1", "attn1", "to_v"),
        ("down_blocks.1.attentions.1", "attn2", "to_v"),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"attribute": "colour"}, "shape, appearance, style"),
        ({"attribute": "shape", "attn": ("attn3",)}, "attn1, attn2"),
        ({"attribute": "shape", "attn": ()}, "must not be empty"),
        ({"attribute": "shape", "proj": ("to_x", "to_q")}, "to_q, to_k, to_v, to_out.0"),
        ({"attribute": "shape", "proj": []}, "must not be empty"),
        ({"attribute": "shape", "blocks": ("input_blocks.4.1",)}, "diffusers form"),
        ({"attribute": "shape", "blocks": ("down_blocks.1",)}, "diffusers form"),
        ({"attribute": "shape", "blocks": ()}, "diffusers form"),
    ],
)
def test_bad_specs_raise_input_error(spec: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TargetSpec(**spec)


def test_blocks_the_model_lacks_raise_input_error_listing_valid_ones() -> None:
    spec = TargetSpec("style", blocks=("up_blocks.2.attentions.0",))  # SDXL level 0: no attn
    with pytest.raises(InputError, match=re.escape("up_blocks.1.attentions.2")) as e:
        select_targets(unet("sdxl", "ldm"), spec)
    assert "up_blocks.2.attentions.0" in str(e.value)
    assert select_targets(unet("sd1", "ldm"), spec)[0].name.startswith("output_blocks.6.1.")


def test_linear_subclasses_are_selected_and_wrappers_are_not() -> None:
    class PatchedLinear(nn.Linear):  # WebUIs swap classes like this
        pass

    model = tiny_ldm_unet("sd1")
    info = inspect_unet(model)
    to_q = [t.name for t in select_targets(model, TargetSpec("shape", proj=("to_q",)), info)]
    parent = find_module(model, to_q[0].rsplit(".", 1)[0])
    old = parent.to_q
    parent.to_q = PatchedLinear(old.in_features, old.out_features, bias=old.bias is not None)
    assert [t.name for t in select_targets(model, TargetSpec("shape", proj=("to_q",)))] == to_q
    for name in to_q:  # wrap every to_q in a non-Linear container
        holder = find_module(model, name.rsplit(".", 1)[0])
        holder.to_q = nn.Sequential(holder.to_q)
    with pytest.raises(InputError, match=re.escape("not nn.Linear")):
        select_targets(model, TargetSpec("shape", proj=("to_q",)), info)
    assert len(select_targets(model, TargetSpec("shape", proj=("to_k",)), info)) == len(to_q)


def test_find_module() -> None:
    model = unet("sd1", "diffusers")
    assert find_module(model, "conv_in") is model.conv_in
    with pytest.raises(IncompatibleModelError, match="no module"):
        find_module(model, "down_blocks.9.attentions.0")
    with pytest.raises(IncompatibleModelError):
        find_module(model, "input_blocks.1.1")


def test_select_targets_rejects_non_sd_model() -> None:
    with pytest.raises(IncompatibleModelError):
        select_targets(nn.Sequential(nn.Linear(4, 4)), TargetSpec("shape"))


def test_hand_built_info_is_completed_from_the_unet() -> None:
    model = unet("sdxl", "ldm")
    full = inspect_unet(model)
    bare = type(full)("sdxl", "ldm", 2, CONTEXT_DIM, 3)
    assert available_blocks(model, bare) == BLOCKS["sdxl"]
    assert select_targets(model, TargetSpec("shape"), bare) == select_targets(
        model, TargetSpec("shape"), full
    )
