"""Rebuild ``lib_ostaf/world/tiny/world.safetensors``: the embedded tiny SD1 model trained on
the attribute world (``lib_ostaf.world.attributes``).

* VAE: built analytically, not trained — an exact 8× average-pool encoder and 8× nearest
  decoder in AutoencoderKL's own layers (see :func:`analytic_vae`). The world lives on a
  16×16 grid, so the 16×16×4 latent holds it losslessly (RGB + one zero channel).
* UNet + CLIP text encoder: trained jointly from scratch with the standard ε loss,
  10 % caption dropout (for classifier-free guidance), AdamW with warm-up and cosine
  decay, EMA weights; an EMA checkpoint every ``--ckpt-every`` steps (fp16) so the best
  one can be picked by a sample score (``bench/attribute_benchmark.py --pick``).

    python bench/train_tiny.py --steps 600 --out runs/tiny   # then --install CKPT
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

if not __package__:  # python bench/train_tiny.py: see bench/_root.py
    import _root  # noqa: F401

from lib_ostaf.world import attributes as world
from lib_ostaf.world import tiny

BIG = 1000.0  # constant channels that make GroupNorm (almost exactly) an affine no-op


def _identity_resnets(module: torch.nn.Module) -> None:
    """Zero every residual branch (resnet conv2, attention output): blocks become identity."""
    for name, p in module.named_parameters():
        if ".conv2." in name or "attentions.0.to_out" in name:
            torch.nn.init.zeros_(p)


def _signed_groups(conv: torch.nn.Conv2d, weights: torch.Tensor) -> None:
    """conv(x) → channels [y, −y, BIG, −BIG] per group of 4, y = ``weights`` · centre tap.

    GroupNorm over such a group has mean 0 and variance ≈ BIG²/2 whatever y is, so it
    only scales y by √2/BIG; and SiLU(z) − SiLU(−z) = z undoes the activation exactly.
    """
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    k = conv.kernel_size[0] // 2
    for g in range(weights.shape[0]):
        conv.weight.data[4 * g, :, k, k] = weights[g]
        conv.weight.data[4 * g + 1, :, k, k] = -weights[g]
        conv.bias.data[4 * g + 2] = BIG
        conv.bias.data[4 * g + 3] = -BIG


def _unsign(conv: torch.nn.Conv2d, rows: int, offset: int = 0) -> None:
    """conv_out after GroupNorm+SiLU: output ``offset + i`` = y_i (undoing the √2/BIG scale)."""
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    k = conv.kernel_size[0] // 2
    s = BIG / math.sqrt(2.0)
    for i in range(rows):
        conv.weight.data[offset + i, 4 * i, k, k] = s
        conv.weight.data[offset + i, 4 * i + 1, k, k] = -s


def _unit_norms(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)


@torch.no_grad()
def analytic_vae(vae: torch.nn.Module) -> torch.nn.Module:
    """Make an AutoencoderKL(**tiny.WORLD_VAE) an exact 8× pool / 8× nearest autoencoder."""
    enc, dec = vae.encoder, vae.decoder
    _unit_norms(vae)
    _identity_resnets(vae)
    eye3 = torch.eye(3)
    # encoder: conv_in → RGB groups; each Downsample = 2×2 mean; conv_out → mean, logvar
    _signed_groups(enc.conv_in, torch.cat([eye3, torch.zeros(1, 3)]))
    for block in enc.down_blocks:
        for ds in block.downsamplers or []:
            torch.nn.init.zeros_(ds.conv.weight)
            torch.nn.init.zeros_(ds.conv.bias)
            c = ds.conv.weight.shape[0]
            for ch in range(c):
                ds.conv.weight.data[ch, ch, :2, :2] = 0.25
    _unsign(enc.conv_out, 3)
    enc.conv_out.bias.data[4:] = -30.0  # log-variance: sampling is deterministic
    for q in (vae.quant_conv, vae.post_quant_conv):
        if q is not None:
            torch.nn.init.zeros_(q.weight)
            torch.nn.init.zeros_(q.bias)
            n = min(q.weight.shape[:2])
            q.weight.data[:n, :n, 0, 0] = torch.eye(n)
    # decoder: conv_in → RGB groups; Upsample conv = identity; conv_out → RGB
    _signed_groups(dec.conv_in, torch.cat([torch.eye(3, 4), torch.zeros(1, 4)]))
    for block in dec.up_blocks:
        for us in block.upsamplers or []:
            torch.nn.init.zeros_(us.conv.weight)
            torch.nn.init.zeros_(us.conv.bias)
            for ch in range(us.conv.weight.shape[0]):
                us.conv.weight.data[ch, ch, 1, 1] = 1.0
    _unsign(dec.conv_out, 3)
    return vae


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def latents_of(images: np.ndarray) -> torch.Tensor:
    """World 16×16 images → the analytic VAE's latents (RGB + zero channel), exactly."""
    x = torch.from_numpy(images)
    return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1) * tiny.WORLD_VAE["scaling_factor"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--install", type=Path, default=None, help="checkpoint → weights file")
    ap.add_argument("--resume", type=Path, default=None, help="start from a checkpoint")
    args = ap.parse_args()
    if args.install:
        install(args.install)
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    parts = tiny.components("sd1", seed=tiny.SEED + args.seed, world=True, weights=False)
    unet, text, tok = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    vae = analytic_vae(parts["vae"])
    if args.resume:  # a further stage: live and EMA weights start from the checkpoint
        tiny.load_weights(parts, args.resume)
        vae = analytic_vae(parts["vae"])
    unet.train().requires_grad_(True)
    text.train().requires_grad_(True)
    ema = {"unet": copy.deepcopy(unet).eval(), "text_encoder": copy.deepcopy(text).eval()}
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    betas = (
        torch.linspace(tiny.SCHEDULER["beta_start"] ** 0.5, tiny.SCHEDULER["beta_end"] ** 0.5, 1000)
        ** 2
    )
    abar = torch.cumprod(1 - betas.double(), 0).float()
    gen = torch.Generator().manual_seed(args.seed)
    log = (args.out / "log.jsonl").open("a")
    started = time.time()
    for step in range(1, args.steps + 1):
        frac = min(1.0, step / args.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * step / args.steps))
        lr = frac * (args.min_lr + (args.lr - args.min_lr) * cos)
        for g in opt.param_groups:
            g["lr"] = lr
        images, caps, _ = world.batch(args.batch, seed=args.seed * 1_000_003 + step)
        caps = ["" if torch.rand((), generator=gen) < 0.1 else c for c in caps]
        x0 = latents_of(images)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = encode_prompts(tok, text, caps)
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, live in (("unet", unet), ("text_encoder", text)):
                for pe, pl in zip(ema[name].parameters(), live.parameters(), strict=True):
                    pe.lerp_(pl, 1 - decay)
        rec = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "s": time.time() - started}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(args.out / f"ckpt_{step:05d}.safetensors", ema, vae)
            print(json.dumps(rec), flush=True)


def save_checkpoint(path: Path, models: dict, vae: torch.nn.Module) -> None:
    """``unet.*``/``vae.*``/``text_encoder.*`` in fp16 (the VAE in fp32: BIG constants)."""
    state: dict[str, torch.Tensor] = {}
    for name, m in models.items():
        state |= {f"{name}.{k}": v.detach().half() for k, v in m.state_dict().items()}
    state |= {f"vae.{k}": v.detach().float() for k, v in vae.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def install(ckpt: Path) -> None:
    state = load_file(str(ckpt))
    save_file(state, str(tiny.WEIGHTS), metadata={"source": ckpt.name})
    print(f"installed {ckpt} → {tiny.WEIGHTS} ({tiny.WEIGHTS.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
