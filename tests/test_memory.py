"""Memory/speed options (performance issue, item 1): gradient checkpointing gives the same
gradients with fewer stored activations; bf16 autocast trains; bad options are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lib_ostaf.errors import InputError
from lib_ostaf.method.memory import gradient_checkpointing, training_options
from lib_ostaf.method.offsets import OffsetHooks
from lib_ostaf.method.targets import TargetSpec, find_module, select_targets
from lib_ostaf.method.train import AttributeConfig, train_attribute

from .unets import CONTEXT_DIM, tiny_ldm_unet

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(unet, call, checkpointed: bool):
    targets = select_targets(unet, TargetSpec(attribute="appearance"))
    modules = {t.kohya: find_module(unet, t.name) for t in targets}
    g = torch.Generator().manual_seed(0)
    factors = {
        t.kohya: (
            (torch.randn(2, t.in_features, generator=g) * 0.1).requires_grad_(),
            (torch.randn(t.out_features, 2, generator=g) * 0.1).requires_grad_(),
        )
        for t in targets
    }
    with OffsetHooks(modules) as hooks:
        hooks.factors = factors
        if checkpointed:
            with gradient_checkpointing(unet) as n:
                assert n > 0
                call().square().mean().backward()
        else:
            n = 0
            call().square().mean().backward()
    return [p.grad for pair in factors.values() for p in pair], n


def test_checkpointing_same_gradients_on_the_ldm_unet():
    unet = tiny_ldm_unet("sd1").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, CONTEXT_DIM, generator=g)

    def call():
        return unet(x, torch.tensor([300]), context=ctx)

    plain, _ = _grads(unet, call, False)
    ckpt, n = _grads(unet, call, True)
    assert n >= 6  # ResBlocks and BasicTransformerBlocks of the A1111 (ldm) UNet
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, ckpt, strict=True))
    assert not any("forward" in vars(m) for m in unet.modules())  # restored


def test_checkpointing_same_gradients_on_diffusers(sd1_host):
    g = torch.Generator().manual_seed(1)
    latent = sd1_host.resolution // 8
    x = torch.randn(1, 4, latent, latent, generator=g)
    cond = sd1_host.encode_prompt("a photo")

    def call():
        return sd1_host.predict_noise(x, torch.tensor([300]), cond)

    plain, _ = _grads(sd1_host.unet, call, False)
    ckpt, n = _grads(sd1_host.unet, call, True)
    assert n > 0 and all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, ckpt, strict=True)
    )


def test_training_with_options(sd1_host, reference_image):
    fast = {"steps": 3, "lr": 1e-2, "n_views": 1}
    base = train_attribute(sd1_host, reference_image, AttributeConfig(**fast))
    ckpt = train_attribute(
        sd1_host, reference_image, AttributeConfig(gradient_checkpointing="on", **fast)
    )
    assert ckpt.losses == pytest.approx(base.losses, rel=1e-5)
    bf16 = train_attribute(sd1_host, reference_image, AttributeConfig(precision="bf16", **fast))
    assert bf16.losses == pytest.approx(base.losses, rel=0.05)  # bf16: ~3 significant digits
    assert all(torch.isfinite(t).all() for pair in bf16.factors().values() for t in pair)
    assert all(p.dtype == torch.float32 for p in bf16.network.parameters())
    with pytest.raises(InputError, match="CUDA"):
        train_attribute(sd1_host, reference_image, AttributeConfig(precision="fp16", **fast))
    for bad in ({"precision": "fp8"}, {"gradient_checkpointing": "maybe"}):
        with pytest.raises(InputError):
            AttributeConfig(**bad)


def test_loss_scaling_follows_the_hosts_compute_dtype():
    """A1111 can keep fp32 weights and run its UNet in fp16 under its own autocast: the
    host's compute dtype, not only the weights', decides the loss scaling."""
    unet = tiny_ldm_unet("sd1").eval().requires_grad_(False)  # fp32 weights
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with training_options(unet, cpu, "sd1", "auto", "off") as p:
        assert p.scaler is None and p.dtype is None
    for compute, scaled in ((torch.float16, True), (torch.bfloat16, False), (torch.float32, False)):
        with training_options(unet, cpu, "sd1", "auto", "off", compute_dtype=compute) as p:
            assert (p.scaler is not None) is scaled and p.dtype is None
    # auto on a GPU stacks no autocast of ours on a host that already computes in fp16
    with training_options(unet, cuda, "sd1", "auto", "off", compute_dtype=torch.float16) as p:
        assert p.dtype is None and p.scaler is not None


@pytest.mark.parametrize("what", ["attribute", "objects"])
def test_trainers_pass_the_hosts_compute_dtype(what, sd1_host, reference_image, monkeypatch):
    import lib_ostaf.method.objects.training as objects
    import lib_ostaf.method.train as train

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compute_dtype"))
        return training_options(*args, **kwargs)

    if what == "attribute":
        monkeypatch.setattr(train, "training_options", spy)
        train_attribute(sd1_host, reference_image, AttributeConfig(steps=1, n_views=1))
    else:
        monkeypatch.setattr(objects, "training_options", spy)
        image = Image.open(reference_image).convert("RGB")
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[8:-8, 8:-8] = True
        objects.train_objects(
            sd1_host,
            image,
            [objects.ObjectSpec("<o1>", "ball", mask)],
            objects.ObjectConfig(steps=1, embedding_steps=0, n_probe=1, clip="none"),
        )
    assert seen == [sd1_host.dtype]
