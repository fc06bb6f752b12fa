"""The paper's metrics on a real checkpoint: CLIP-T, DINO and VGG Gram distance.

For users with a real SD checkpoint and a GPU. Nothing is downloaded: every model comes
from a path you give (``--clip``: a transformers CLIP folder, e.g. openai/clip-vit-large-
patch14; ``--dino``: a transformers ViT folder, e.g. facebook/dino-vits16; ``--vgg``: VGG-19
weights in torchvision's key layout, ``features.N.weight``, as .safetensors or .pth).

For each reference image it trains (or loads, ``--adapter``) an OSTAF adapter, generates
the evaluation prompts at each λ, and scores every image:

* **CLIP-T** ↑ — cosine of CLIP's image embedding and the embedding of the prompt with the
  placeholder token removed (text controllability);
* **DINO** ↑ — cosine of DINO's CLS features of the image and of the reference (shape /
  subject fidelity);
* **Gram** ↓ — mean over VGG-19 relu1_1…relu5_1 of the squared Frobenius distance between
  normalised Gram matrices of the image and of the reference (appearance / style);
* **silhouette IoU** ↑ — IoU of the image's object mask and the reference's (automatic
  masks, position and scale normalised): the shape;
* **colour** ↓ — total-variation distance of the object's colour histogram to the
  reference object's: the appearance, with no model at all.

Each row also names the adapter's **fidelity** (its own attribute) and **leak** (the
other attribute moving towards the reference, against λ = 0; positive = leaks): an
appearance adapter leaks when the silhouette IoU rises, a shape adapter when the colour
(and Gram) distance falls — the same roles as ``bench/attribute_benchmark.py``.

    python bench/real_metrics.py --model /models/sd15 --clip /models/clip-vit-large-patch14 \\
        --dino /models/dino-vits16 --vgg /models/vgg19.safetensors \\
        --reference mug.png --attribute appearance --prompts prompts.txt \\
        --lambdas 0 0.5 1 1.5 --device cuda --out results.json

``prompts.txt``: one prompt per line containing ``{token}`` (e.g. "a {token} teapot").
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

if not __package__:  # python bench/real_metrics.py: see bench/_root.py
    import _root  # noqa: F401

# VGG-19 "features": (out channels | "M" for max-pool); relu1_1…relu5_1 follow these convs.
VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M")  # fmt: skip
GRAM_LAYERS = (1, 6, 11, 20, 29)  # indices of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_features() -> nn.Sequential:
    """torchvision's ``vgg19().features`` layout, without torchvision."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            channels = int(v)
    return nn.Sequential(*layers)


def load_vgg(path: str | Path) -> nn.Sequential:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("features."): v for k, v in state.items() if "classifier" not in k}
    net = vgg19_features()
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def _pixels(images: Sequence[Image.Image], size: int, mean, std) -> torch.Tensor:
    arr = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255
           for im in images]  # fmt: skip
    x = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@torch.no_grad()
def gram_matrices(vgg: nn.Sequential, images: Sequence[Image.Image], size: int = 256) -> list:
    """Per image, the normalised Gram matrix after each of :data:`GRAM_LAYERS`."""
    x = _pixels(images, size, IMAGENET_MEAN, IMAGENET_STD).to(next(vgg.parameters()).device)
    grams = []
    for i, layer in enumerate(vgg):
        x = layer(x)
        if i in GRAM_LAYERS:
            f = x.flatten(2)  # [n, c, hw]
            grams.append(f @ f.transpose(1, 2) / f.shape[-1] / f.shape[1])
        if i >= max(GRAM_LAYERS):
            break
    return [[g[j].cpu() for g in grams] for j in range(len(images))]


def gram_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(statistics.fmean(float((x - y).square().sum()) for x, y in zip(a, b, strict=True)))


class ClipScorer:
    """CLIP image/text embeddings from a transformers CLIP folder."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        vision = self.model.config.vision_config
        self.size = int(vision.image_size)
        self.device = device

    @torch.no_grad()
    def image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = _pixels(images, self.size, (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))
        out = self.model.get_image_features(pixel_values=x.to(self.device))
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(**{k: v.to(self.device) for k, v in ids.items()})
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1).cpu()


class DinoScorer:
    """DINO ViT CLS features from a transformers folder."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.size = int(getattr(self.model.config, "image_size", 224))
        self.device = device

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = _pixels(images, self.size, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        cls = self.model(pixel_values=x).last_hidden_state[:, 0]
        return F.normalize(cls.float(), dim=-1).cpu()


def object_mask(image: Image.Image) -> np.ndarray:
    """The image's main object (automatic; the whole image if none stands out)."""
    from lib_ostaf.method.augment import object_mask as find

    return find(image.convert("RGB"))


def shape_and_colour(images: Sequence[Image.Image], reference: Image.Image) -> dict[str, float]:
    """Mean silhouette IoU and colour-histogram distance of ``images`` to ``reference``."""
    from bench.judges import colour_distance, colour_histogram, iou, normalised

    def parts(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        img = img.convert("RGB").resize((128, 128), Image.Resampling.BOX)
        mask = object_mask(img)
        return normalised(mask, 64), colour_histogram(np.asarray(img) / 255.0, mask)

    ref_shape, ref_hist = parts(reference)
    pairs = [parts(img) for img in images]
    return {
        "silhouette_iou": statistics.fmean(iou(m, ref_shape) for m, _ in pairs),
        "colour": statistics.fmean(colour_distance(h, ref_hist) for _, h in pairs),
    }


# fidelity / leak metric per attribute, and whether a higher value is closer to the reference
ROLES = {
    "shape": {"fidelity": ("silhouette_iou", True), "leak": ("colour", False)},
    "appearance": {"fidelity": ("colour", False), "leak": ("silhouette_iou", True)},
    "style": {"fidelity": ("colour", False), "leak": ("silhouette_iou", True)},
}


def with_roles(rows: list[dict[str, Any]], attribute: str) -> list[dict[str, Any]]:
    """Add ``fidelity`` / ``leak`` (moves towards the reference against the λ = 0 row)."""
    base = next((r for r in rows if r["lambda"] == 0), rows[0])
    out = []
    for r in rows:
        extra = {}
        for role, (key, higher) in ROLES[attribute].items():
            move = r[key] - base[key]
            extra[role] = {"metric": key, "value": r[key], "gain": move if higher else -move}
        out.append(r | extra)
    return out


def score(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    reference: Image.Image,
    *,
    clip: ClipScorer | None,
    dino: DinoScorer | None,
    vgg: nn.Sequential | None,
) -> dict[str, float]:
    """Mean CLIP-T, DINO, Gram, silhouette IoU and colour distance of ``images`` (prompts:
    without the placeholder)."""
    out: dict[str, float] = shape_and_colour(images, reference)
    if clip is not None:
        out["clip_t"] = float((clip.image(images) * clip.text(prompts)).sum(-1).mean())
    if dino is not None:
        feats = dino.features([reference, *images])
        out["dino"] = float((feats[1:] @ feats[0]).mean())
    if vgg is not None:
        grams = gram_matrices(vgg, [reference, *images])
        out["gram"] = statistics.fmean(gram_distance(g, grams[0]) for g in grams[1:])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="diffusers folder or .safetensors checkpoint")
    ap.add_argument("--reference", required=True, type=Path)
    ap.add_argument("--attribute", default="appearance", choices=("appearance", "shape", "style"))
    ap.add_argument("--prompts", required=True, type=Path, help="one prompt per line, {token}")
    ap.add_argument("--adapter", type=Path, help="an existing adapter (else one is trained)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--clip", type=Path)
    ap.add_argument("--dino", type=Path)
    ap.add_argument("--vgg", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("real_metrics.json"))
    args = ap.parse_args(argv)

    from lib_ostaf.files.adapter_file import load_adapter
    from lib_ostaf.hosts.diffusers_host import DiffusersHost
    from lib_ostaf.method.images import load_image
    from lib_ostaf.method.train import AttributeConfig, export, train_attribute

    reference = load_image(args.reference)
    prompts = [p.strip() for p in args.prompts.read_text().splitlines() if p.strip()]
    if not prompts or any("{token}" not in p for p in prompts):
        raise SystemExit("every prompt must contain {token}")
    host = DiffusersHost.load(args.model, device=args.device)
    config = AttributeConfig(attribute=args.attribute, steps=args.steps)
    if args.adapter:
        path = args.adapter
    else:
        result = train_attribute(host, reference, config)
        path = export(result, args.out.parent, f"{args.out.stem}_{args.attribute}", overwrite=True)
    adapter = load_adapter(path)
    clip = ClipScorer(args.clip, args.device) if args.clip else None
    dino = DinoScorer(args.dino, args.device) if args.dino else None
    vgg = load_vgg(args.vgg).to(args.device) if args.vgg else None
    token = config.token
    rows: list[dict[str, Any]] = []
    for lam in args.lambdas:
        host.apply_adapters([(adapter, lam)] if lam else [])
        images, plain = [], []
        for prompt in prompts:
            for seed in range(args.seeds):
                images.append(host.generate(prompt.replace("{token}", token), seed=seed))
                plain.append(" ".join(prompt.replace("{token}", "").split()))
        rows.append(
            {"lambda": lam, **score(images, plain, reference, clip=clip, dino=dino, vgg=vgg)}
        )
        print(json.dumps(rows[-1]))
    host.apply_adapters([])
    rows = with_roles(rows, args.attribute)
    result = {"adapter": path.name, "attribute": args.attribute, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
