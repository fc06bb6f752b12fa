"""Small previews through any :class:`~lib_ostaf.method.host.Host`: a deterministic DDIM
sampler on ``host.predict_noise`` (so whatever offsets are hooked in show up), decoded by
the host's ``decode_latents``. Used for the live preview while training and the λ sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from lib_ostaf.method.host import Conditioning, Host
from lib_ostaf.method.images import grid


@torch.no_grad()
def sample_latents(
    host: Host,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    *,
    steps: int = 12,
    seed: int = 0,
    size: int | None = None,
    guidance: float = 5.0,
) -> torch.Tensor:
    """DDIM (η = 0) from seeded noise; classifier-free guidance when ``uncond`` is given."""
    size = int(size or host.resolution)
    scale = int(getattr(host, "latent_scale", 8))
    channels = int(getattr(host, "latent_channels", 4))
    ac = host.alphas_cumprod.double()
    n = len(ac)
    steps = max(1, min(int(steps), n))
    ts = torch.linspace(n - 1, 0, steps).round().long().tolist()
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn((1, channels, size // scale, size // scale), generator=g, dtype=torch.float64)
    for i, t in enumerate(ts):
        a = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        eps = _eps(host, x, t, cond, a)
        if uncond is not None and guidance != 1.0:
            eps_u = _eps(host, x, t, uncond, a)
            eps = eps_u + guidance * (eps - eps_u)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.float()


def _eps(host: Host, x: torch.Tensor, t: int, cond: Conditioning, a: torch.Tensor) -> torch.Tensor:
    tt = torch.tensor([t], dtype=torch.long, device=host.device)
    out = host.predict_noise(x.to(host.device, host.dtype), tt, cond).double().cpu()
    if host.prediction_type == "v_prediction":  # v = √a ε − √(1−a) x0  ⇒  ε = √a v + √(1−a) x
        return a.sqrt() * out + (1 - a).sqrt() * x
    return out


def render(
    host: Host,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    **kwargs: Any,
) -> Image.Image:
    """One preview image (the host must provide ``decode_latents``)."""
    decode = getattr(host, "decode_latents", None)
    if decode is None:
        raise NotImplementedError(f"{type(host).__name__} cannot decode previews")
    return decode(sample_latents(host, cond, uncond, **kwargs))


def lambda_strip(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """Images side by side with a label strip (the λ sweep of a result card)."""
    return grid(list(images), len(images), list(labels))
