"""UNet inspection and name mapping on tiny SD1/SD2/SDXL UNets in diffusers and ldm layouts."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

from bench.memory_model import SDXL_UNET
from lib_ostaf.errors import IncompatibleModelError, InputError
from lib_ostaf.files.naming import (
    UNetInfo,
    diffusers_to_ldm,
    inspect_unet,
    kohya_name,
    ldm_to_diffusers,
    module_name_from_kohya,
    split_block,
)
from tests.unets import (
    CONTEXT_DIM,
    FAMILIES,
    tiny_diffusers_unet,
    tiny_ldm_unet,
    tiny_unet_inputs,
)

LAYOUTS = ("diffusers", "ldm")
# Raw, independent of the code under test: module paths inside attention blocks.
_IN_ATTN = {
    "diffusers": re.compile(r"^((down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+)\."),
    "ldm": re.compile(r"^((input|output)_blocks\.\d+\.1|middle_block\.1)\."),
}


def in_attention_block(model: nn.Module, name: str, layout: str) -> bool:
    """Whether ``name`` (or a path below it) lies in a spatial transformer of ``model``."""
    m = _IN_ATTN[layout].match(name + ".")
    return bool(m) and hasattr(model.get_submodule(m[1]), "transformer_blocks")


_PROJ = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# Attention projections per family with layers_per_block=2 (see tests/unets.py):
# SD1/SD2: 4 down + 1 mid + 6 up blocks, depth 1; SDXL: depths 1,1,2,2 | 2 | 2,2,2,1,1,1.
N_PROJ = {"sd1": 11 * 8, "sd2": 11 * 8, "sdxl": 17 * 8}


@functools.cache
def unet(family: str, layout: str, layers_per_block: int = 2) -> nn.Module:
    """Cached tiny UNet; tests that modify a UNet build their own."""
    build = tiny_diffusers_unet if layout == "diffusers" else tiny_ldm_unet
    return build(family, layers_per_block=layers_per_block)


def attn_linears(model: nn.Module, layout: str) -> dict[str, tuple[int, ...]]:
    """{name: weight shape} of every nn.Linear inside an attention block."""
    return {
        n: tuple(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and in_attention_block(model, n, layout)
    }


def test_tiny_unets_have_equal_architecture() -> None:
    for family in FAMILIES:
        d, m = unet(family, "diffusers"), unet(family, "ldm")
        assert sum(p.numel() for p in d.parameters()) == sum(p.numel() for p in m.parameters())
        with torch.no_grad():
            out_d = d(**tiny_unet_inputs(family, "diffusers")).sample
            out_l = m(**tiny_unet_inputs(family, "ldm"))
        assert out_d.shape == out_l.shape == (1, 4, 8, 8)
        assert torch.isfinite(out_d).all() and torch.isfinite(out_l).all()
        assert not d.training and not m.training


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_unet(family: str, layout: str) -> None:
    info = inspect_unet(unet(family, layout))
    assert (info.family, info.layout) == (family, layout)
    assert (info.layers_per_block, info.num_levels, info.context_dim) == (2, 3, CONTEXT_DIM)
    if family == "sdxl":
        assert info.attention_blocks[0] == "down_blocks.1.attentions.0"
        assert info.transformer_depths == (1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 1)
        assert "up_blocks.2.attentions.0" not in info.attention_blocks
    else:
        assert info.attention_blocks[0] == "down_blocks.0.attentions.0"
        assert info.transformer_depths == (1,) * 11
        assert "up_blocks.0.attentions.0" not in info.attention_blocks
    assert len(info.attention_blocks) == 11
    assert info.depth("mid_block.attentions.0") == (2 if family == "sdxl" else 1)
    assert info.depth("down_blocks.9.attentions.0") == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_agrees_across_layouts(family: str) -> None:
    a, b = inspect_unet(unet(family, "diffusers")), inspect_unet(unet(family, "ldm"))
    assert a.attention_blocks == b.attention_blocks
    assert a.transformer_depths == b.transformer_depths


def test_inspect_ldm_duck_typed_without_attributes() -> None:
    """sgm/Forge-like UNets may lack num_res_blocks / channel_mult: derive them from structure."""
    for lpb in (1, 2):
        model = tiny_ldm_unet("sd1", layers_per_block=lpb)
        del model.num_res_blocks, model.channel_mult
        info = inspect_unet(model)
        assert (info.layers_per_block, info.num_levels, info.family) == (lpb, 3, "sd1")


def test_inspect_rejects_non_sd_models() -> None:
    from diffusers import UNet2DModel

    uncond = UNet2DModel(
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        layers_per_block=1,
    )
    for model in (nn.Linear(2, 2), uncond):
        with pytest.raises(IncompatibleModelError):
            inspect_unet(model)
    with pytest.raises(IncompatibleModelError):
        inspect_unet("unet")  # type: ignore[arg-type]


@pytest.mark.parametrize("layers_per_block", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_ldm_names_map_onto_diffusers_names(family: str, layers_per_block: int) -> None:
    d_model = unet(family, "diffusers", layers_per_block)
    l_model = unet(family, "ldm", layers_per_block)
    info = inspect_unet(l_model)
    assert info.layers_per_block == layers_per_block
    d_lin, l_lin = attn_linears(d_model, "diffusers"), attn_linears(l_model, "ldm")
    mapped = {ldm_to_diffusers(n, info): shape for n, shape in l_lin.items()}
    assert mapped == d_lin  # same names, same weight shapes
    projections = [n for n in mapped if _PROJ.search(n)]
    if layers_per_block == 2:
        assert len(projections) == N_PROJ[family]
    # attn2 to_k / to_v read the text context
    assert {mapped[n][1] for n in projections if re.search(r"attn2\.to_[kv]$", n)} == {CONTEXT_DIM}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_layout_mapping_round_trips(family: str, layout: str) -> None:
    model = unet(family, layout)
    info = inspect_unet(model)
    there, back = (
        (ldm_to_diffusers, diffusers_to_ldm)
        if layout == "ldm"
        else (diffusers_to_ldm, ldm_to_diffusers)
    )
    names = [n for n, _ in model.named_modules() if in_attention_block(model, n, layout)]
    assert len(names) > 100
    for n in names:
        assert back(there(n, info), info) == n


def test_known_ldm_diffusers_pairs() -> None:
    sd1 = inspect_unet(unet("sd1", "ldm"))
    xl = inspect_unet(unet("sdxl", "ldm"))
    pairs = [
        (sd1, "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0"),
        (sd1, "input_blocks.5.1.proj_in", "down_blocks.1.attentions.1"),
        (sd1, "middle_block.1.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0"),
        (sd1, "output_blocks.3.1.transformer_blocks.0.attn2.to_v", "up_blocks.1.attentions.0"),
        (sd1, "output_blocks.8.1.norm", "up_blocks.2.attentions.2"),
        (xl, "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0", "down_blocks.1.attentions.0"),
        (xl, "input_blocks.8.1.transformer_blocks.1.ff.net.2", "down_blocks.2.attentions.1"),
        (xl, "output_blocks.0.1.transformer_blocks.1.attn1.to_q", "up_blocks.0.attentions.0"),
        (xl, "output_blocks.5.1.transformer_blocks.0.attn2.to_q", "up_blocks.1.attentions.2"),
    ]
    for info, ldm_name, block in pairs:
        rest = re.sub(r"^(input_blocks\.\d+|output_blocks\.\d+|middle_block)\.1\.", "", ldm_name)
        assert ldm_to_diffusers(ldm_name, info) == f"{block}.{rest}"
        assert split_block(ldm_name, info) == (block, rest)


def test_layout_mapping_rejects_other_names() -> None:
    sd1 = inspect_unet(unet("sd1", "ldm"))
    xl = inspect_unet(unet("sdxl", "ldm"))
    for info, name in [
        (sd1, "input_blocks.0.0"),  # conv_in
        (sd1, "input_blocks.3.1"),  # downsample slot
        (sd1, "input_blocks.1.0.in_layers.2"),  # resnet
        (sd1, "output_blocks.2.1.conv"),  # SD1 level without attention: .1 is the Upsample
        (sd1, "down_blocks.0.attentions.0.proj_in"),  # already diffusers
        (sd1, "input_blocks.01.1.proj_in"),
        (xl, "input_blocks.1.1.proj_in"),  # SDXL level 0 has no attention
        (xl, "time_embed.0"),
    ]:
        with pytest.raises(InputError):
            ldm_to_diffusers(name, info)
    for info, name in [
        (sd1, "down_blocks.0.resnets.0.conv1"),
        (sd1, "up_blocks.0.attentions.0.proj_in"),  # SD1 up_blocks.0 has no attention
        (sd1, "down_blocks.3.attentions.0"),
        (xl, "down_blocks.0.attentions.0.norm"),
        (xl, "input_blocks.4.1.norm"),
    ]:
        with pytest.raises(InputError):
            diffusers_to_ldm(name, info)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_names_follow_family_convention(family: str) -> None:
    d_info = inspect_unet(unet(family, "diffusers"))
    l_info = inspect_unet(unet(family, "ldm"))
    l_names = attn_linears(unet(family, "ldm"), "ldm")
    keys = set()
    for n in l_names:
        key = kohya_name(n, l_info)
        assert key == kohya_name(ldm_to_diffusers(n, l_info), d_info)  # layout-independent
        keys.add(key)
        if family == "sdxl":
            assert key == "lora_unet_" + n.replace(".", "_")
        else:
            assert key == "lora_unet_" + ldm_to_diffusers(n, l_info).replace(".", "_")
    assert len(keys) == len(l_names)
    prefixes = (
        ("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_")
        if family == "sdxl"
        else ("lora_unet_down_blocks_", "lora_unet_mid_block_attentions_0_", "lora_unet_up_blocks_")
    )
    assert {next(p for p in prefixes if k.startswith(p)) for k in keys} == set(prefixes)


def test_kohya_name_examples() -> None:
    sd1 = inspect_unet(unet("sd1", "diffusers"))
    xl_d = inspect_unet(unet("sdxl", "diffusers"))
    xl_l = inspect_unet(unet("sdxl", "ldm"))
    assert (
        kohya_name("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", sd1)
        == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    )
    assert (
        kohya_name("input_blocks.7.1.transformer_blocks.1.attn1.to_out.0", xl_l)
        == kohya_name("down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_out.0", xl_d)
        == "lora_unet_input_blocks_7_1_transformer_blocks_1_attn1_to_out_0"
    )
    assert (
        kohya_name("mid_block.attentions.0.transformer_blocks.1.attn2.to_q", xl_d)
        == "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_q"
    )
    assert (
        kohya_name("up_blocks.0.attentions.0.proj_out", xl_d)
        == "lora_unet_output_blocks_0_1_proj_out"
    )


def test_kohya_name_rejects_unnameable_modules() -> None:
    info = inspect_unet(unet("sd1", "diffusers"))
    for name in (
        "down_blocks.0.attentions.0",  # the block itself
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1",  # not a layer
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.1",  # dropout
        "down_blocks.0.resnets.0.conv1",
        "conv_in",
    ):
        with pytest.raises(InputError):
            kohya_name(name, info)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_module_name_from_kohya_inverts_kohya_name(family: str, layout: str) -> None:
    model = unet(family, layout)
    info = inspect_unet(model)
    modules = dict(model.named_modules())
    names = attn_linears(model, layout)  # projections, ff, and proj_in/out where Linear
    assert any(n.endswith("ff.net.0.proj") for n in names)
    for n in names:
        key = kohya_name(n, info)
        assert module_name_from_kohya(key, info) == n
        assert module_name_from_kohya(key, info, modules) == n
        assert module_name_from_kohya(key + ".lora_down.weight", info) == n
        assert module_name_from_kohya(key + ".alpha", info) == n
    for rest in ("norm", "proj_in", "proj_out", "transformer_blocks.0.norm3"):
        name = f"{split_block(next(iter(names)), info)[0]}.{rest}"
        if layout == "ldm":
            name = diffusers_to_ldm(name, info)
        assert module_name_from_kohya(kohya_name(name, info), info) == name


@pytest.mark.parametrize("family", FAMILIES)
def test_module_name_from_kohya_accepts_both_conventions(family: str) -> None:
    """SD1 files with ldm names and SDXL files with diffusers names map to the same layers."""
    d_info = inspect_unet(unet(family, "diffusers"))
    l_info = inspect_unet(unet(family, "ldm"))
    for d_name in attn_linears(unet(family, "diffusers"), "diffusers"):
        l_name = diffusers_to_ldm(d_name, d_info)
        for key_path in (d_name, l_name):
            key = "lora_unet_" + key_path.replace(".", "_")
            assert module_name_from_kohya(key, d_info) == d_name
            assert module_name_from_kohya(key, l_info) == l_name


@pytest.mark.parametrize(
    ("family", "key"),
    [
        ("sd1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
        ("sdxl", "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"),
        ("sd1", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"),
        ("sd1", "lora_unet_down_blocks_0_resnets_0_conv1"),  # not an attention block
        ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_x"),
        ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out"),
        ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q"),  # depth
        ("sd1", "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_q"),  # level
        ("sd1", "lora_unet_down_blocks_0_attentions_2_transformer_blocks_0_attn1_to_q"),  # j
        ("sd1", "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"),
        ("sd1", "lora_unet_mid_block_attentions_1_transformer_blocks_0_attn2_to_k"),
        ("sd1", "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"),  # downsample
        ("sd1", "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q"),  # SDXL-only
        ("sdxl", "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"),  # SD1-only
        ("sdxl", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"),  # depth 1 here
        ("sdxl", "lora_unet_input_blocks_40_1_transformer_blocks_0_attn1_to_q"),
        ("sdxl", "lora_unet_middle_block_1_transformer_blocks_2_attn1_to_q"),
        ("sdxl", "lora_unet_"),
        ("sdxl", ""),
    ],
)
def test_module_name_from_kohya_rejects_keys_that_do_not_fit(family: str, key: str) -> None:
    for layout in LAYOUTS:
        with pytest.raises(IncompatibleModelError):
            module_name_from_kohya(key, inspect_unet(unet(family, layout)))


def test_module_name_from_kohya_checks_module_names() -> None:
    model = unet("sd2", "ldm")
    info = inspect_unet(model)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert module_name_from_kohya(key, info) == "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    with pytest.raises(IncompatibleModelError):
        module_name_from_kohya(key, info, {"input_blocks.1.1.transformer_blocks.0.attn1.to_k"})


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_kohya_converter_agrees(family: str) -> None:
    """diffusers' own kohya → PEFT conversion (sgm block remap for SDXL) gives our names."""
    lcu = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    utils = pytest.importorskip("diffusers.utils")
    remap = getattr(lcu, "_maybe_map_sgm_blocks_to_diffusers", None)
    convert = getattr(lcu, "_convert_non_diffusers_lora_to_diffusers", None)
    to_peft = getattr(utils, "convert_unet_state_dict_to_peft", None)
    if remap is None or convert is None or to_peft is None:
        pytest.skip("diffusers' private kohya conversion helpers are absent in this version")
    d_model, l_model = unet(family, "diffusers"), unet(family, "ldm")
    l_info = inspect_unet(l_model)
    for l_name, (out_f, in_f) in attn_linears(l_model, "ldm").items():
        key = kohya_name(l_name, l_info)
        sd = {
            f"{key}.lora_down.weight": torch.zeros(1, in_f),
            f"{key}.lora_up.weight": torch.zeros(out_f, 1),
        }
        sd = remap(sd, d_model.config)  # (state_dict, unet_config, delimiter, block_slice_pos)
        converted, _alphas = convert(sd)
        peft = to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
        expected = ldm_to_diffusers(l_name, l_info)
        assert set(peft) == {f"{expected}.lora_A.weight", f"{expected}.lora_B.weight"}, l_name


# Published SD configs (SD1.5 / SD2.1 / SDXL base), built on the meta device: no memory, no data.
_REAL_DIFFUSERS = {
    "sd1": {"cross_attention_dim": 768, "attention_head_dim": 8},
    "sd2": {
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
    },
    "sdxl": SDXL_UNET,  # the memory model's (bench/memory_model.py)
}
_REAL_LDM = {  # sdkit's ldm UNetModel cannot build SDXL (per-level transformer_depth)
    "sd1": {"num_heads": 8, "context_dim": 768},
    "sd2": {"num_head_channels": 64, "context_dim": 1024, "use_linear_in_transformer": True},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_architectures(family: str) -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        d_model = UNet2DConditionModel(**_REAL_DIFFUSERS[family])
    d_info = inspect_unet(d_model)
    context = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]
    assert (d_info.family, d_info.context_dim, d_info.layers_per_block) == (family, context, 2)
    d_lin = attn_linears(d_model, "diffusers")
    projections = [n for n in d_lin if _PROJ.search(n)]
    # SD1/SD2: 16 transformers; SDXL: 2·2 + 2·10 (down) + 10 (mid) + 3·10 + 3·2 (up) = 70
    assert len(projections) == {"sd1": 16, "sd2": 16, "sdxl": 70}[family] * 8
    for n in d_lin:
        assert module_name_from_kohya(kohya_name(n, d_info), d_info) == n
    if family == "sdxl":
        examples = {
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_out_0": (
                "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0"
            ),
            "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k": (
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"
            ),
            "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v": (
                "mid_block.attentions.0.transformer_blocks.9.attn2.to_v"
            ),
            "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_0_proj": (
                "up_blocks.0.attentions.0.transformer_blocks.9.ff.net.0.proj"
            ),
            "lora_unet_output_blocks_5_1_proj_in": "up_blocks.1.attentions.2.proj_in",
        }
        for key, name in examples.items():
            assert module_name_from_kohya(key, d_info) == name
            assert kohya_name(name, d_info) == key
        with pytest.raises(IncompatibleModelError):  # depth 2 at level 1
            module_name_from_kohya(
                "lora_unet_input_blocks_4_1_transformer_blocks_2_attn1_to_q", d_info
            )
        return
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        l_model = UNetModel(
            image_size=64,
            in_channels=4,
            out_channels=4,
            model_channels=320,
            attention_resolutions=(4, 2, 1),
            num_res_blocks=2,
            channel_mult=(1, 2, 4, 4),
            use_spatial_transformer=True,
            transformer_depth=1,
            legacy=False,
            **_REAL_LDM[family],
        )
    l_info = inspect_unet(l_model)
    assert (l_info.family, l_info.context_dim, l_info.num_levels) == (family, context, 4)
    mapped = {ldm_to_diffusers(n, l_info): s for n, s in attn_linears(l_model, "ldm").items()}
    assert mapped == d_lin
    assert (
        module_name_from_kohya(
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", l_info
        )
        == "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    )
    assert (
        module_name_from_kohya("lora_unet_up_blocks_3_attentions_2_proj_out", l_info)
        == "output_blocks.11.1.proj_out"
    )


def test_hand_built_info_checks_structure_only() -> None:
    """An info without the block list (e.g. from file metadata) maps by index arithmetic."""
    full = inspect_unet(unet("sd1", "ldm"))
    bare = UNetInfo("sd1", "ldm", full.layers_per_block, full.context_dim, full.num_levels)
    assert bare.depth("down_blocks.2.attentions.1") is None  # unknown, structurally possible
    assert bare.depth("down_blocks.2.attentions.2") == 0  # downsample slot
    assert bare.depth("down_blocks.3.attentions.0") == 0  # no such level
    assert bare.depth("mid_block.attentions.1") == 0
    for name in attn_linears(unet("sd1", "ldm"), "ldm"):
        key = kohya_name(name, bare)
        assert key == kohya_name(name, full)
        assert module_name_from_kohya(key, bare) == name
    key = "lora_unet_down_blocks_2_attentions_0_transformer_blocks_3_attn1_to_q"
    assert module_name_from_kohya(key, bare) == "input_blocks.7.1.transformer_blocks.3.attn1.to_q"
    with pytest.raises(IncompatibleModelError):
        module_name_from_kohya(key, full)  # the real UNet has no attention at level 2
    with pytest.raises(IncompatibleModelError):
        module_name_from_kohya(key.replace("down_blocks_2", "down_blocks_3"), bare)
