"""The embedded default model: a tiny Stable-Diffusion-1-architecture pipeline.

Same classes and module names as SD1.x (UNet2DConditionModel with CrossAttn down/up
blocks, AutoencoderKL, CLIPTextModel, CLIPTokenizer), tiny widths, built
deterministically from the files in this folder: ``words.txt`` (vocabulary), the configs
below and a seed — or from ``weights.safetensors`` when that file is present (a model
pretrained on the attribute world). No downloads.

An SDXL-architecture variant (two text encoders, ``text_time`` conditioning) exists for
tests of the SDXL naming and file paths.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "world.safetensors"  # the attribute-world model (bench/train_tiny.py)
SEED = 20240318
RESOLUTION = 128  # pixels; latents are 16×16

SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (32, 32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": RESOLUTION,
    "scaling_factor": 0.18215,
}


# The world model: SD1's AutoencoderKL structure (8×, 4 latent channels) at width 16 whose
# shipped weights make it an exact 8× average-pool / nearest-upsample autoencoder
# (bench/train_tiny.py): the attribute world lives on a 16×16 grid, so latents are the
# world's RGB (+ a zero channel) and all training time went to the UNet and text encoder.
WORLD_VAE = VAE | {
    "block_out_channels": (16, 16, 16, 16),
    "norm_num_groups": 4,
    "scaling_factor": 1.0,
}
WORLD_UNET_CHANNELS = (16, 32, 32, 32)  # narrow top level: trainable on 2 CPU cores


def unet_config(family: str = "sd1") -> dict[str, Any]:
    """UNet config with the structure of ``family`` (SD1 or SDXL) at tiny width."""
    common = {
        "sample_size": RESOLUTION // 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 8,
    }
    if family == "sd1":
        return common | {
            "block_out_channels": (32, 64, 64, 64),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
        }
    if family == "sdxl":
        return common | {
            "block_out_channels": (32, 64, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 2),
            "cross_attention_dim": 96,  # 64 (CLIP-L stand-in) + 32 (CLIP-G stand-in)
            "attention_head_dim": (2, 4, 8),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
        }
    raise ValueError(f"unknown tiny family {family!r}")


def text_config(hidden: int = 64, projection: int | None = None) -> dict[str, Any]:
    return {
        "vocab_size": len(vocabulary()[0]),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": projection or hidden,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the best-ranked adjacent pair."""
    while len(pieces) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(pairwise(pieces))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pair = (pieces[i], pieces[i + 1])
        merged: list[str] = []
        j = 0
        while j < len(pieces):
            if j + 1 < len(pieces) and (pieces[j], pieces[j + 1]) == pair:
                merged.append(pieces[j] + pieces[j + 1])
                j += 2
            else:
                merged.append(pieces[j])
                j += 1
        pieces = merged
    return pieces


@lru_cache(maxsize=1)
def vocabulary() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a CLIP BPE whose whole words are the lines of words.txt.

    Every byte (with and without ``</w>``) is a token, so any text tokenizes. Words are
    added in order: BPE is run with the merges so far and the pieces it leaves are joined
    by new, lowest-ranked merges — which cannot change any earlier word, already one token.
    """
    chars = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    lines = (HERE / "words.txt").read_text(encoding="utf-8").splitlines()
    words = [w.strip() for w in lines if w.strip() and not w.startswith("#")]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        prefix = pieces[0]
        for piece in pieces[1:]:
            ranks[(prefix, piece)] = len(ranks)
            prefix += piece
            tokens.append(prefix)
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, [f"{a} {b}" for a, b in ranks]


def tokenizer():
    """A ``CLIPTokenizer`` over :func:`vocabulary` (files written to a temp folder)."""
    from transformers import CLIPTokenizer

    vocab, merges = vocabulary()
    with tempfile.TemporaryDirectory(prefix="ostaf-tok-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
        )
        return CLIPTokenizer(
            str(Path(tmp) / "vocab.json"),
            str(Path(tmp) / "merges.txt"),
            model_max_length=77,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )


def components(
    family: str = "sd1", *, seed: int = SEED, world: bool = False, weights: bool = True
) -> dict[str, Any]:
    """Pipeline components (unet, vae, text_encoder[, _2], tokenizer[, _2], scheduler).

    ``world``: the SD1 model trained on the attribute world (:data:`WEIGHTS`; ``weights``
    False gives its untrained architecture). Otherwise random weights, deterministic in
    ``seed`` (what the tests use: same structure and naming as a real checkpoint).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if world and family != "sd1":
        raise ValueError("the attribute-world model is SD1-structured")
    unet_cfg = unet_config(family)
    if world:
        unet_cfg |= {"block_out_channels": WORLD_UNET_CHANNELS}
    torch.manual_seed(seed)
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel(**unet_cfg),
        "vae": AutoencoderKL(**(WORLD_VAE if world else VAE)),
        "scheduler": DDIMScheduler(**SCHEDULER),
        "tokenizer": tokenizer(),
    }
    if family == "sd1":
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_config(64)))
    else:
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_config(64)))
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**text_config(32, projection=32))
        )
        parts["tokenizer_2"] = tokenizer()
    if world and weights:
        load_weights(parts, WEIGHTS)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].eval().requires_grad_(False)
    return parts


def load_weights(parts: dict[str, Any], path: Path) -> None:
    """Load ``unet.*``/``vae.*``/``text_encoder.*`` tensors of a shipped weights file."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    for name in ("unet", "vae", "text_encoder"):
        sub = {k[len(name) + 1 :]: v.float() for k, v in state.items() if k.startswith(name + ".")}
        parts[name].load_state_dict(sub, strict=True)


VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 16,
}


def clip_tower(text_encoder: Any, *, seed: int = SEED + 1) -> Any:
    """A tiny CLIP image tower matching ``text_encoder`` (for the prototypical embedding).

    A text encoder with its own projection (SDXL's CLIP-G stand-in) gets a
    ``CLIPVisionModelWithProjection`` of the same projection width; one without (SD1's
    CLIP-L stand-in) gets a full ``CLIPModel`` whose text tower is a copy of it, so the
    text projection belongs to the same CLIP. Random, deterministic in ``seed``.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if getattr(text_encoder, "text_projection", None) is not None:
            projection = int(text_encoder.config.projection_dim)
            tower = CLIPVisionModelWithProjection(
                CLIPVisionConfig(**VISION, projection_dim=projection)
            )
        else:
            config = CLIPConfig(
                text_config=text_encoder.config.to_dict(), vision_config=VISION, projection_dim=32
            )
            tower = CLIPModel(config)
            state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
            tower.text_model.load_state_dict(state)
    finally:
        torch.random.set_rng_state(generator_state)
    return tower.eval().requires_grad_(False)
