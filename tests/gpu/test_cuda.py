"""On a CUDA GPU (skipped without one): the standalone model lands on the GPU in half
precision, and training on fp16 weights learns with loss scaling.

Run with ``python -m pytest tests/gpu`` on a machine with CUDA; tiny models only, no
downloads, about a minute.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_picks_the_gpu_and_half_weights():
    from lib_ostaf.hosts.devices import choose_device, choose_dtype

    device = choose_device("auto")
    assert device.type == "cuda"
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert choose_dtype("auto", device) == want


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_training_on_half_weights_on_the_gpu(dtype, reference_image):
    from lib_ostaf.hosts.diffusers_host import DiffusersHost
    from lib_ostaf.method.memory import training_options
    from lib_ostaf.method.train import AttributeConfig, train_attribute

    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    host = DiffusersHost.load("tiny-sd1", device="cuda", dtype=dtype, resolution=256)
    half = torch.float16 if dtype == "fp16" else torch.bfloat16
    assert host.device.type == "cuda" and host.dtype == half
    with training_options(host.unet, host.device, host.family, "auto", "auto") as precision:
        assert (precision.scaler is not None) == (dtype == "fp16")
    result = train_attribute(host, reference_image, AttributeConfig(steps=20, lr=1e-2, n_views=2))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.probe_loss_after < result.probe_loss_before
    assert all(p.dtype == torch.float32 for p in result.network.parameters())


def test_fp16_autocast_on_fp32_weights_scales_the_loss():
    from lib_ostaf.hosts.diffusers_host import DiffusersHost
    from lib_ostaf.method.memory import training_options

    host = DiffusersHost.load("tiny-sd1", device="cuda", dtype="fp32")
    with training_options(host.unet, host.device, host.family, "fp16", "on") as precision:
        assert precision.dtype == torch.float16 and precision.scaler is not None
