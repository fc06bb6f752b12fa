"""Memory model of an OSTAF training step: predicted peak GPU memory for SD1.5 at 512² and
SDXL at 1024², per option set, from parameter and activation counts.

Counts, not guesses: the UNet is built on PyTorch's ``meta`` device (shapes only, no
memory), one training forward runs there with the adapter's offsets hooked in, and every
tensor autograd saves for the backward is counted (``saved_tensors_hooks``; a tensor saved
by several ops counted once, frozen weights not counted: they are resident anyway). With
gradient checkpointing, what is saved is the blocks' inputs plus, during the backward, the
largest single block recomputed. Peak ≈ UNet weights + trainable state (parameter, grad,
two AdamW moments, fp32) + saved activations. Text encoders and VAE are not counted: their
outputs are cached before the loop, so the WebUI can offload them (``--medvram``).

Validation (CPU, small sizes): the same count on real tensors equals the meta count, and the
resident-memory growth of a real forward (the saved activations) is compared to it.

    python bench/memory_model.py [--validate-only]
"""

from __future__ import annotations

import argparse
import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

if not __package__:  # python bench/memory_model.py: see bench/_root.py
    import _root  # noqa: F401

from bench._root import ROOT
from bench.step_benchmark import SD15_UNET
from lib_ostaf.method.hypernet import HypernetConfig, LayerShape, OstafHypernet
from lib_ostaf.method.memory import CHECKPOINTED, gradient_checkpointing
from lib_ostaf.method.offsets import OffsetHooks
from lib_ostaf.method.targets import TargetSpec, find_module, select_targets

GIB = 2**30
SDXL_UNET: dict[str, Any] = {  # diffusers config of stabilityai/stable-diffusion-xl-base-1.0
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
MODELS = {"SD1.5": (SD15_UNET, 512, 77, 768), "SDXL": (SDXL_UNET, 1024, 77, 2048)}


def build(config: dict[str, Any], device: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config)
    return unet.eval().requires_grad_(False)


def inputs(unet: nn.Module, latent: int, ctx: tuple[int, int], dtype, device) -> dict[str, Any]:
    x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    kw: dict[str, Any] = {
        "sample": x,
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, *ctx, device=device, dtype=dtype),
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = pooled_dim(unet.config)
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, device=device, dtype=dtype),
            "time_ids": torch.randn(1, 6, device=device, dtype=dtype),
        }
    return kw


def pooled_dim(config: Any) -> int:
    """Width of the pooled text embedding an SDXL-type (``text_time``) UNet expects: what
    its added projection takes beyond the six time ids (1280 on SDXL)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    return get("projection_class_embeddings_input_dim") - 6 * get("addition_time_embed_dim")


@contextmanager
def hooked_adapter(unet: nn.Module, device: str) -> Iterator[int]:
    """The OSTAF hypernetwork's offsets on the appearance targets; yields its parameters."""
    targets = select_targets(unet, TargetSpec(attribute="appearance"))
    layers = [LayerShape(t.kohya, f"{t.attn}.{t.proj}", t.in_features, t.out_features)
              for t in targets]  # fmt: skip
    with torch.device(device):
        net = OstafHypernet(layers, HypernetConfig(rank=4))
    modules = {t.kohya: find_module(unet, t.name) for t in targets}
    with OffsetHooks(modules) as hooks:
        hooks.factors = net()
        yield sum(p.numel() for p in net.parameters())


def count_saved(unet: nn.Module, latent: int, ctx, dtype, device: str, ckpt: bool) -> dict:
    """Bytes saved for backward by one training forward (+ largest block when checkpointed)."""
    params = {id(p) for p in unet.parameters()}
    seen: set[int] = set()
    total = {"bytes": 0, "scores": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in seen:  # views of weights: no new memory
            seen.add(id(t))
            n = t.numel() * t.element_size()
            total["bytes"] += n
            if t.dim() >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 64:
                total["scores"] += n  # a self-attention probability matrix [.., HW, HW]
        return t

    block_max = {"bytes": 0, "lean": 0}

    def enter(mod: nn.Module, args: Any) -> None:
        mod._ostaf_mark = (total["bytes"], total["scores"])

    def leave(mod: nn.Module, args: Any, out: Any) -> None:
        b0, s0 = mod._ostaf_mark
        grown, scores = total["bytes"] - b0, total["scores"] - s0
        block_max["bytes"] = max(block_max["bytes"], grown)
        block_max["lean"] = max(block_max["lean"], grown - scores)

    if ckpt:  # the largest block's own activations, recomputed one at a time in backward
        marks: list[Any] = []
        for m in unet.modules():
            if type(m).__name__ in CHECKPOINTED:
                marks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        with (
            hooked_adapter(unet, device),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", enabled=False),
        ):
            unet(**inputs(unet, latent, ctx, dtype, device))
        for h in marks:
            h.remove()
        seen.clear()
        total.update(bytes=0, scores=0)
    with hooked_adapter(unet, device) as trainable:
        cm = gradient_checkpointing(unet) if ckpt else _null()
        with cm, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(**inputs(unet, latent, ctx, dtype, device)).sample
            loss = out.float().square().mean()
    del loss, out
    return {
        "saved": total["bytes"],
        "scores": total["scores"],
        "block": block_max["bytes"],
        "block_lean": block_max["lean"],
        "trainable": trainable,
    }


@contextmanager
def _null() -> Iterator[None]:
    yield


def predict_row(
    unet: nn.Module, name: str, px: int, ctx: tuple[int, int], ckpt: bool, label: str = ""
) -> dict[str, Any]:
    """Predicted peak of one option set for ``unet`` (built on ``meta`` in its weights'
    dtype) at ``px`` pixels; ``bench/gpu_check.py`` compares it with a GPU's."""
    dtype = next(unet.parameters()).dtype
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    c = count_saved(unet, px // 8, ctx, dtype, "meta", ckpt)
    state = c["trainable"] * 16  # fp32 param + grad + 2 AdamW moments
    act = c["saved"] + c["block"]
    # memory-efficient attention (SDPA flash/mem-efficient, xformers) keeps no
    # [HW, HW] probabilities; with checkpointing they only live inside one block
    lean = c["saved"] - c["scores"] + c["block_lean"]
    return {
        "model": name, "size": px, "weights": label or str(dtype).removeprefix("torch."),
        "checkpointing": ckpt, "weights_gib": weights / GIB, "activations_gib": act / GIB,
        "lean_activations_gib": lean / GIB, "state_gib": state / GIB,
        "peak_gib": (weights + act + state) / GIB,
        "lean_peak_gib": (weights + lean + state) / GIB,
    }  # fmt: skip


def predict(name: str) -> list[dict[str, Any]]:
    config, px, ctx_len, ctx_dim = MODELS[name]
    rows = []
    for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16/bf16")):
        unet = build(config, "meta").to(dtype)
        for ckpt in (False, True):
            rows.append(predict_row(unet, name, px, (ctx_len, ctx_dim), ckpt, label))
        del unet
    return rows


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def validate() -> list[dict[str, Any]]:
    """Meta count = real count; real RSS growth of a forward vs the count (SD1.5, CPU)."""
    torch.set_flush_denormal(True)
    real = build(SD15_UNET, "cpu")
    meta = build(SD15_UNET, "meta")
    out = []
    for latent in (8, 16):
        for ckpt in (False, True):
            m = count_saved(meta, latent, (77, 768), torch.float32, "meta", ckpt)
            gc.collect()
            with hooked_adapter(real, "cpu"):
                before = _rss()
                cm = gradient_checkpointing(real) if ckpt else _null()
                with cm:
                    y = real(**inputs(real, latent, (77, 768), torch.float32, "cpu")).sample
                grown = _rss() - before
                del y
            r = count_saved(real, latent, (77, 768), torch.float32, "cpu", ckpt)
            out.append({
                "latent": latent, "checkpointing": ckpt, "meta_saved": m["saved"],
                "real_saved": r["saved"], "rss_growth": grown,
            })  # fmt: skip
    return out


def report(pred: list[dict[str, Any]], val: list[dict[str, Any]]) -> str:
    lines = [
        "# Memory model: predicted peak memory of one OSTAF training step",
        "",
        "Appearance adapter (decoder attention q/k/v/out, rank 4, hypernetwork), batch 1, "
        "AdamW; UNet only (text encoders and VAE offloaded after caching). Add the CUDA "
        "context (~0.5 GiB) and allocator slack.",
        "",
        "| model | size | UNet weights | checkpointing | weights | trainable state | "
        "activations (math attn.) | peak (math attn.) | activations (SDPA/xformers) | "
        "**peak (SDPA/xformers)** |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in pred:
        ck = "on" if r["checkpointing"] else "off"
        lines.append(
            f"| {r['model']} | {r['size']}² | {r['weights']} | {ck} | {r['weights_gib']:.2f} GiB"
            f" | {r['state_gib'] * 1024:.0f} MiB | {r['activations_gib']:.2f} GiB | "
            f"{r['peak_gib']:.2f} GiB | {r['lean_activations_gib']:.2f} GiB | "
            f"**{r['lean_peak_gib']:.2f} GiB** |"
        )
    lines += [
        "",
        "Validation on CPU (SD1.5-shaped UNet, fp32): bytes saved for backward counted on the "
        "meta device vs on real tensors, and the resident-memory growth of the real forward.",
        "",
        "| latent | checkpointing | meta count | real count | RSS growth | growth ÷ count |",
        "|---|---|---|---|---|---|",
    ]
    for v in val:
        lines.append(
            f"| {v['latent']}² | {'on' if v['checkpointing'] else 'off'} | "
            f"{v['meta_saved'] / 2**20:.1f} MiB | {v['real_saved'] / 2**20:.1f} MiB | "
            f"{v['rss_growth'] / 2**20:.1f} MiB | "
            f"{v['rss_growth'] / max(1, v['real_saved']):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/memory_model.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pred = predict("SD1.5") + predict("SDXL")
    val = validate()
    text = report(pred, val)
    print(text)
    args.out.write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(
        json.dumps({"predicted": pred, "validation": val}, indent=1) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
