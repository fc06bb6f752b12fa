"""Our files load unchanged in diffusers' own kohya loader and give the same weights.

Also: the key set follows kohya's convention per family (SD1 diffusers names, SDXL sgm
names), computed here independently of lib_ostaf.files.naming.
"""

from __future__ import annotations

import re

import pytest
import torch

from lib_ostaf.files.adapter_file import load_adapter
from lib_ostaf.hosts.diffusers_host import DiffusersHost
from lib_ostaf.method.targets import default_blocks
from lib_ostaf.method.train import AttributeConfig, export, train_attribute

from .conftest import pristine, same_weights

LAMBDA = 0.7


def _kohya_expected(unet: torch.nn.Module, family: str, part: str) -> set[str]:
    """kohya module names of every attention projection in ``part`` (independent rule)."""
    names = set()
    pattern = re.compile(
        r"^(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.*attn[12]\.(to_[qkv]|to_out\.0))$"
    )
    for name, module in unet.named_modules():
        m = pattern.match(name)
        if not m or not isinstance(module, torch.nn.Linear) or m.group(1) != part:
            continue
        if family == "sdxl":  # sgm names: down i,j → input_blocks 1+3i+j ; up i,j → output 3i+j
            i, j = int(m.group(2)), int(m.group(3))
            block = (
                f"input_blocks.{1 + 3 * i + j}.1"
                if part == "down"
                else f"output_blocks.{3 * i + j}.1"
            )
            name = f"{block}.{m.group(4)}"
        names.add("lora_unet_" + name.replace(".", "_"))
    return names


@pytest.mark.parametrize(
    "family,attribute,blocks",
    [
        ("sd1", "appearance", "part"),
        ("sd1", "shape", "part"),
        ("sdxl", "appearance", "part"),
        ("sdxl", "shape", "part"),
        ("sd1", "shape", "default"),  # the bottleneck: encoder, mid and decoder keys
        ("sdxl", "shape", "default"),
    ],
)
def test_diffusers_load_lora_weights_equals_our_merge(
    family, attribute, blocks, reference_image, tmp_path
):
    ours = DiffusersHost.load(f"tiny-{family}")
    part = "down" if attribute == "shape" else "up"
    chosen = None
    if blocks == "part":  # the whole encoder / decoder, so the names follow one rule here
        chosen = default_blocks(ours.unet, "encoder" if part == "down" else "decoder")
    cfg = AttributeConfig(attribute=attribute, steps=4, lr=3e-3, n_views=2, blocks=chosen)
    result = train_attribute(ours, reference_image, cfg)
    path = export(result, tmp_path, f"{family}_{attribute}")
    adapter = load_adapter(path)

    if blocks == "part":
        assert set(adapter.modules) == _kohya_expected(ours.unet, family, part)
        prefix = "lora_unet_input_blocks_" if family == "sdxl" and part == "down" else None
        if prefix:
            assert all(k.startswith(prefix) for k in adapter.modules)
    else:
        mid = "lora_unet_middle_block_1_" if family == "sdxl" else "lora_unet_mid_block_"
        assert any(k.startswith(mid) for k in adapter.modules)

    base = pristine(ours.unet)
    ours.apply_adapters([(adapter, LAMBDA)])
    merged = pristine(ours.unet)
    ours.apply_adapters([])
    assert same_weights(ours.unet, base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)

    theirs = DiffusersHost.load(f"tiny-{family}")  # a fresh, identical pipeline
    assert same_weights(theirs.unet, base)
    theirs.pipe.load_lora_weights(str(path))
    theirs.pipe.fuse_lora(lora_scale=LAMBDA)
    theirs.pipe.unload_lora_weights()
    fused = theirs.unet.state_dict()
    assert fused.keys() == merged.keys()
    changed = 0
    for key in merged:
        torch.testing.assert_close(fused[key], merged[key], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(base[key], fused[key])
    assert changed == len(adapter.modules)  # exactly one weight per LoRA module moved
