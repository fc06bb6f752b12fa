"""The embedded attribute-world model (the demo's default): small enough to ship, loaded by
default, and its VAE is the exact 8× pool / upsample the training script builds."""

from __future__ import annotations

import numpy as np
import torch

from lib_ostaf.hosts.diffusers_host import DiffusersHost
from lib_ostaf.world import attributes as world
from lib_ostaf.world import tiny


def test_world_model_ships_small_and_is_the_default():
    assert tiny.WEIGHTS.stat().st_size < 20e6
    host = DiffusersHost.load(None)
    assert host.base_model_name == "tiny-world" and host.resolution == 128
    assert tuple(host.unet.config.block_out_channels) == tiny.WORLD_UNET_CHANNELS
    # deterministic: two loads are the same weights
    again = DiffusersHost.load("tiny-world")
    a, b = host.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_world_vae_round_trips_world_images():
    host = DiffusersHost.load(None)
    rng = np.random.default_rng(0)
    for _ in range(3):
        image, _mask = world.render(world.random_spec(rng))
        latents = host.encode_image(image)
        assert latents.shape == (1, 4, 16, 16)
        vae = host.pipe.vae
        with torch.no_grad():
            x = vae.decode(latents.float() / vae.config.scaling_factor).sample[0]
        back = ((x.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
        assert np.abs(back - np.asarray(image.convert("RGB"), np.float32)).mean() < 1.0
