"""Tiny, seeded SD1 / SD2 / SDXL-shaped UNets in both layouts (diffusers and ldm) for tests.

The two builders of a family produce the SAME architecture (channels, levels, resnets per level,
attention levels, transformer depth, context dim), so module names map one-to-one between them
and mapped weights have equal shapes. Everything is tiny so that a forward pass takes
milliseconds on a CPU.

ldm side: ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` from stable-diffusion-sdkit, the
Stability-AI "stablediffusion" class that AUTOMATIC1111 uses for SD1/SD2. It predates SDXL: it has
no ``adm_in_channels``, rejects ``num_classes="sequential"`` and takes only an integer
``transformer_depth``. For SDXL we therefore build it with the deepest depth and trim each
SpatialTransformer to its level's depth (and let one context tensor feed every depth, as sgm
does; sdkit would index a per-depth context list), then add sgm's ``label_emb`` (nested
Sequential) and the ``num_classes="sequential"`` / ``adm_in_channels`` attributes. The result
has the module tree of sgm's SDXL UNetModel (which A1111 uses for SDXL) and still runs forward
with ``y``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

FAMILIES = ("sd1", "sd2", "sdxl")
CONTEXT_DIM = 32  # cross-attention (text) dim
HEAD_DIM = 8
CHANNELS = (32, 64, 64)  # per level; ldm GroupNorm(32) needs multiples of 32
POOLED_DIM = 32  # SDXL pooled text embedding ("text_embeds")
ADD_TIME_DIM = 8  # SDXL addition_time_embed_dim
ADM_IN_CHANNELS = 6 * ADD_TIME_DIM + POOLED_DIM  # SDXL label_emb input (y)
LATENT_CHANNELS = 4


def _attention_levels(family: str) -> tuple[int, ...]:
    # SD1/SD2: attention everywhere but the deepest level; SDXL: none at level 0.
    n = len(CHANNELS)
    return tuple(range(1, n)) if family == "sdxl" else tuple(range(n - 1))


def _depths(family: str) -> tuple[int, ...]:
    """Transformer depth per level (0 where the level has no attention); mid uses the last."""
    if family == "sdxl":
        return (0, 1, 2)  # non-uniform, like SDXL's (0, 2, 10)
    return tuple(1 if lvl in _attention_levels(family) else 0 for lvl in range(len(CHANNELS)))


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def tiny_diffusers_unet(family: str, layers_per_block: int = 2, seed: int = 0) -> nn.Module:
    """A tiny ``diffusers.UNet2DConditionModel`` with the block structure of ``family``."""
    from diffusers import UNet2DConditionModel

    _check_family(family)
    attn = _attention_levels(family)
    n = len(CHANNELS)
    down = tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n)))
    kwargs: dict = {}
    if family == "sdxl":
        kwargs = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": ADD_TIME_DIM,
            "projection_class_embeddings_input_dim": ADM_IN_CHANNELS,
            "transformer_layers_per_block": tuple(max(d, 1) for d in _depths(family)),
        }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=CHANNELS,
            layers_per_block=layers_per_block,
            norm_num_groups=32,  # as ldm's GroupNorm32
            cross_attention_dim=CONTEXT_DIM,
            # diffusers' legacy "attention_head_dim" is the number of heads per level
            attention_head_dim=tuple(c // HEAD_DIM for c in CHANNELS),
            use_linear_projection=family != "sd1",
            **kwargs,
        )
    return unet.eval()


def tiny_ldm_unet(family: str, layers_per_block: int = 2, seed: int = 0) -> nn.Module:
    """A tiny ldm ``UNetModel`` (sdkit) with the same architecture as ``tiny_diffusers_unet``."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    _check_family(family)
    attn = _attention_levels(family)
    depths = _depths(family)
    n = len(CHANNELS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetModel(
            image_size=8,
            in_channels=LATENT_CHANNELS,
            model_channels=CHANNELS[0],
            out_channels=LATENT_CHANNELS,
            num_res_blocks=layers_per_block,
            attention_resolutions=[2**lvl for lvl in attn],
            channel_mult=tuple(c // CHANNELS[0] for c in CHANNELS),
            num_head_channels=HEAD_DIM,
            use_spatial_transformer=True,
            transformer_depth=max(depths),
            # sdkit indexes a per-depth context_dim list; a plain int fails for depth > 1
            context_dim=[CONTEXT_DIM] * max(depths),
            legacy=False,
            use_linear_in_transformer=family != "sd1",
        )
        if family == "sdxl":
            _trim_depths(unet, depths, layers_per_block)
            ted = unet.time_embed[0].out_features
            unet.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(ADM_IN_CHANNELS, ted), nn.SiLU(), nn.Linear(ted, ted))
            )
            unet.num_classes = "sequential"
            unet.adm_in_channels = ADM_IN_CHANNELS
        # ldm zero-initialises proj_out / ResBlock out convs / the final conv, which would
        # leave attention weights without gradient; re-draw them like diffusers does.
        for m in unet.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not m.weight.any():
                m.reset_parameters()
    assert len(unet.input_blocks) == n * (layers_per_block + 1)
    return unet.eval()


def _trim_depths(unet: nn.Module, depths: tuple[int, ...], layers_per_block: int) -> None:
    """Cut each SpatialTransformer down to its level's depth (sgm's list ``transformer_depth``)."""
    step = layers_per_block + 1
    n = len(depths)
    blocks = [(depths[(i - 1) // step], b) for i, b in enumerate(unet.input_blocks) if i > 0]
    blocks += [(depths[-1], unet.middle_block)]
    blocks += [(depths[n - 1 - i // step], b) for i, b in enumerate(unet.output_blocks)]
    for depth, block in blocks:
        for m in block:
            if hasattr(m, "transformer_blocks"):
                m.transformer_blocks = nn.ModuleList(list(m.transformer_blocks)[:depth])
                m.__class__ = _sgm_spatial_transformer()


@functools.cache
def _sgm_spatial_transformer() -> type:
    from ldm.modules.attention import SpatialTransformer

    class SgmSpatialTransformer(SpatialTransformer):
        """sdkit's SpatialTransformer, but one context tensor feeds every depth (as in sgm)."""

        def forward(self, x: torch.Tensor, context: object = None) -> torch.Tensor:
            if not isinstance(context, list):
                context = [context] * len(self.transformer_blocks)
            return super().forward(x, context=context)

    return SgmSpatialTransformer


def tiny_unet_inputs(
    family: str, layout: str, batch: int = 1, size: int = 8, seed: int = 0
) -> dict[str, object]:
    """Seeded forward kwargs for a tiny UNet of ``family`` in ``layout`` ("diffusers" | "ldm").

    The same seed gives the same tensors for both layouts (ldm ``y`` = diffusers' time-id
    embedding is NOT reproduced, so SDXL outputs differ between layouts by design).
    """
    _check_family(family)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LATENT_CHANNELS, size, size, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    ctx = torch.randn(batch, 7, CONTEXT_DIM, generator=g)
    if layout == "diffusers":
        out: dict[str, object] = {"sample": x, "timestep": t, "encoder_hidden_states": ctx}
        if family == "sdxl":
            out["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, POOLED_DIM, generator=g),
                "time_ids": torch.tensor(
                    [[size * 8.0, size * 8.0, 0.0, 0.0, size * 8.0, size * 8.0]] * batch
                ),
            }
        return out
    if layout == "ldm":
        out = {"x": x, "timesteps": t, "context": ctx}
        if family == "sdxl":
            out["y"] = torch.randn(batch, ADM_IN_CHANNELS, generator=g)
        return out
    raise ValueError(f"layout must be 'diffusers' or 'ldm', got {layout!r}")
