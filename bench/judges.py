"""Judges of the attribute world: a small conv classifier (shape, colour, texture, style
— including the benchmark's new shape and new texture), foreground masks, IoU and Gram
distances. Trained on the world with noise/tint/blur augmentation; cached to a file.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from lib_ostaf.world import attributes as world

HEADS = {
    "shape": (*world.SHAPES, world.NEW_SHAPE),
    "colour": tuple(world.COLOURS),
    "texture": (*world.TEXTURES, world.NEW_TEXTURE),
    "style": world.STYLES,
}


class Judge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 96, 3, padding=1)
        self.c4 = nn.Conv2d(96, 128, 3, padding=1)
        self.heads = nn.ModuleDict({k: nn.Linear(128 * 16, len(v)) for k, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = F.relu(self.c1(x))
        f2 = F.relu(self.c2(f1))
        f3 = F.relu(self.c3(F.max_pool2d(f2, 2)))
        f4 = F.relu(self.c4(F.max_pool2d(f3, 2)))
        return [f1, f2, f3, f4]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)[-1].flatten(1)
        return {k: head(h) for k, head in self.heads.items()}


def _sample(rng: np.random.Generator) -> world.Spec:
    spec = world.random_spec(rng, train=False)
    if rng.random() < 0.12:
        spec = replace(spec, shape=world.NEW_SHAPE)
    if rng.random() < 0.12:
        spec = replace(spec, texture=world.NEW_TEXTURE)
    return spec


def _labels(specs: list[world.Spec]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v.index(getattr(s, k)) for s in specs]) for k, v in HEADS.items()}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    tint = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.3
    x = x + tint + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.15
    blur = torch.rand(n, generator=g) < 0.25
    if blur.any():
        k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype) / 16
        xb = F.conv2d(
            F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3
        )
        x = x.clone()
        x[blur] = xb
    return x.clamp(-1.2, 1.2)


def train_judge(path: Path, steps: int = 1500, seed: int = 0, log=print) -> Judge:
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    rng = np.random.default_rng(seed + 99)
    g = torch.Generator().manual_seed(seed)
    started = time.time()
    for step in range(steps):
        specs = [_sample(rng) for _ in range(64)]
        x = torch.from_numpy(np.stack([world.grid_array(s) for s in specs]))
        out = judge(_augment(x, g))
        labels = _labels(specs)
        loss = sum(F.cross_entropy(out[k], labels[k]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log(f"judge step {step + 1} loss {float(loss):.3f} ({time.time() - started:.0f}s)")
    judge.eval()
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(path))
    return judge


def load_judge(path: Path, **kwargs) -> Judge:
    if path.exists():
        judge = Judge()
        judge.load_state_dict(load_file(str(path)))
        return judge.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    return train_judge(path, **kwargs)


@torch.no_grad()
def judge_accuracy(judge: Judge, n: int = 512, seed: int = 12345) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    specs = [_sample(rng) for _ in range(n)]
    x = torch.from_numpy(np.stack([world.grid_array(s) for s in specs]))
    out, labels = judge(x), _labels(specs)
    return {k: float((out[k].argmax(1) == labels[k]).float().mean()) for k in HEADS}


def to_grid(image: Image.Image) -> torch.Tensor:
    """A 128 px model output → (3, 16, 16) in [-1, 1] (box downsampling)."""
    small = image.convert("RGB").resize((world.GRID, world.GRID), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, np.float32) / 127.5 - 1).permute(2, 0, 1)


def foreground(x: torch.Tensor, threshold: float = 0.3) -> np.ndarray:
    """Object mask of a (3, 16, 16) image: far (max channel) from the border's median."""
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1)
    bg = border.median(dim=1).values.view(3, 1, 1)
    return ((x - bg).abs().amax(0) > threshold).numpy()


def normalised(mask: np.ndarray, size: int = 16) -> np.ndarray:
    """Crop a mask to its bounding box and resize to ``size``² (position/scale invariant)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros((size, size), bool)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255
    img = Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img) > 127


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


@torch.no_grad()
def gram(judge: Judge, x: torch.Tensor, mask: np.ndarray) -> list[torch.Tensor]:
    """Gram matrices of the first two conv layers over the object's pixels."""
    feats = judge.features(x[None])[:2]
    m = torch.from_numpy(mask).float().view(1, -1)
    out = []
    for f in feats:
        f = f[0].flatten(1) * m
        out.append(f @ f.T / m.sum().clamp(min=1))
    return out


def gram_distance(ga: list[torch.Tensor], gb: list[torch.Tensor]) -> float:
    """Mean relative Frobenius distance of Gram matrices (0 = same texture statistics)."""
    return float(
        np.mean([float((a - b).norm() / (b.norm() + 1e-8)) for a, b in zip(ga, gb, strict=True)])
    )


def colour_histogram(rgb: np.ndarray, mask: np.ndarray, bins: int = 4) -> np.ndarray:
    """Normalised RGB histogram (``bins``³) of the masked pixels of an [H, W, 3] image in [0, 1]."""
    pixels = np.asarray(rgb, np.float64)[mask]
    if len(pixels) == 0:
        return np.zeros(bins**3)
    idx = np.minimum((pixels * bins).astype(int), bins - 1)
    flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
    return np.bincount(flat, minlength=bins**3) / len(flat)


def colour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two colour histograms (0 = same colours, 1 = disjoint)."""
    return float(0.5 * np.abs(a - b).sum())
