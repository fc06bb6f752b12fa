"""Applying adapter files to a loaded UNet: family and shape checks leave weights intact."""

from __future__ import annotations

import pytest
import torch

from lib_ostaf.errors import IncompatibleModelError, InputError
from lib_ostaf.files.adapter_file import LoraModule, load_adapter, save_adapter

from .conftest import pristine, same_weights
from .webui_fakes import rank2_metadata

SD1_KEY = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def _write(tmp_path, name, family, key, shape):
    out, inp = shape
    module = LoraModule(down=torch.randn(2, inp), up=torch.randn(out, 2), alpha=2.0)
    md = rank2_metadata(name, family, "attribute", 128, ostaf={})
    return load_adapter(save_adapter(tmp_path / f"{name}.safetensors", {key: module}, md))


@pytest.mark.parametrize(
    ("name", "family", "shape", "message"),
    [("xl", "sdxl", (64, 64), "SDXL"), ("wide", "sd1", (64, 320), "shape")],
    ids=["another-family", "wrong-shapes"],
)
def test_incompatible_adapter_is_refused_and_weights_kept(
    sd1_host, tmp_path, name, family, shape, message
):
    before = pristine(sd1_host.unet)
    adapter = _write(tmp_path, name, family, SD1_KEY, shape)
    with pytest.raises(IncompatibleModelError, match=message):
        sd1_host.apply_adapters([(adapter, 1.0)])
    assert same_weights(sd1_host.unet, before)


def test_adapter_for_layers_the_model_lacks_is_refused(sd1_host, tmp_path):
    key = "lora_unet_up_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    adapter = _write(tmp_path, "deep", "sd1", key, (64, 64))
    with pytest.raises(IncompatibleModelError):
        sd1_host.apply_adapters([(adapter, 1.0)])


def test_good_adapter_then_bad_lambda_keeps_previous_merge(sd1_host, tmp_path):
    adapter = _write(tmp_path, "ok", "sd1", SD1_KEY, (64, 64))
    before = pristine(sd1_host.unet)
    sd1_host.apply_adapters([(adapter, 0.5)])
    merged = pristine(sd1_host.unet)
    with pytest.raises(InputError, match="λ"):
        sd1_host.apply_adapters([(adapter, "strong")])
    assert same_weights(sd1_host.unet, merged)
    sd1_host.apply_adapters([])
    assert same_weights(sd1_host.unet, before)
