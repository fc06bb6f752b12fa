"""The attribute benchmark on the embedded tiny model (trained on ``lib_ostaf.world``).

Two references with attributes the base model never saw — a new *shape* (a blue solid
crescent, "moon") and a new *texture* (red diagonal stripes on a square). For each, every
method is trained on the encoder and on the decoder attention layers with the same steps
and learning rate, then asked for the attribute in new contexts:

* shape:      "a photo of a {colour} {texture} ostafv shaped object"  (other colour/texture)
* appearance: "a photo of a ostafv textured {shape}"                  (other shapes)

Metrics (judges in ``bench/judges.py``, a classifier trained on the world):
* shape IoU of the object mask against the reference's (position/scale normalised),
  and the rate the judge calls it the new shape;
* appearance: Gram distance of the judge's conv features over the object (lower = closer
  texture statistics), the rate the judge calls it the new texture and the reference colour;
* text controllability: the judge's accuracy on the prompt's *other* attributes.

    python bench/attribute_benchmark.py                 # table → bench/results/
    python bench/attribute_benchmark.py --pick runs/tiny  # score base checkpoints
    python bench/attribute_benchmark.py --per-block     # one attention block at a time
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench import judges
from lib_ostaf import world
from lib_ostaf.hosts.diffusers_host import DiffusersHost
from lib_ostaf.train import AttributeConfig, train_attribute

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
ENCODER = tuple(f"down_blocks.{b}.attentions.{i}" for b in range(3) for i in range(2))
DECODER = tuple(f"up_blocks.{b}.attentions.{i}" for b in range(1, 4) for i in range(3))
TOKEN = "ostafv"


@dataclass(frozen=True)
class Case:
    attribute: str
    spec: world.Spec
    prompts: tuple[str, ...]
    others: tuple[dict[str, str], ...]  # the judge's expected other attributes per prompt


def cases() -> dict[str, Case]:
    moon = world.Spec("moon", "blue", "solid", cx=8, cy=8, radius=6.5, background=(240,) * 3)
    diag = world.Spec("square", "red", "diagonal", cx=8, cy=8, radius=7.4, background=(240,) * 3)
    shape_ctx = [(c, t) for c in ("red", "yellow", "green") for t in ("striped", "checker")]
    shapes = ("circle", "star", "triangle", "heart", "cross", "diamond")
    return {
        "shape": Case(
            "shape",
            moon,
            tuple(f"a photo of a {c} {t} {TOKEN} shaped object" for c, t in shape_ctx),
            tuple({"colour": c, "texture": t} for c, t in shape_ctx),
        ),
        "appearance": Case(
            "appearance",
            diag,
            tuple(f"a photo of a {TOKEN} textured {s}" for s in shapes),
            tuple({"shape": s} for s in shapes),
        ),
    }


@torch.no_grad()
def generate(host: DiffusersHost, prompts: list[str], seeds: list[int], steps: int = 20):
    """Batched generation → (n, 3, 16, 16) in [-1, 1] (the world's grid)."""
    out = host.pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
    ).images
    return F.avg_pool2d(out.float() * 2 - 1, world.SCALE)


@torch.no_grad()
def score(judge, case: Case, images: torch.Tensor, prompt_idx: list[int]) -> dict[str, float]:
    ref = torch.from_numpy(world.grid_array(case.spec))
    ref_mask = judges.foreground(ref)
    ref_gram = judges.gram(judge, ref, ref_mask)
    out = judge(images)
    pred = {k: out[k].argmax(1).tolist() for k in out}
    names = judges.HEADS
    ious, grams, ctrl, new_shape, new_tex, colour = [], [], [], [], [], []
    for j, i in enumerate(prompt_idx):
        mask = judges.foreground(images[j])
        ious.append(judges.iou(judges.normalised(mask), judges.normalised(ref_mask)))
        grams.append(judges.gram_distance(judges.gram(judge, images[j], mask), ref_gram))
        new_shape.append(names["shape"][pred["shape"][j]] == world.NEW_SHAPE)
        new_tex.append(names["texture"][pred["texture"][j]] == world.NEW_TEXTURE)
        colour.append(names["colour"][pred["colour"][j]] == case.spec.colour)
        ctrl.extend(names[k][pred[k][j]] == v for k, v in case.others[i].items())
    return {
        "iou": float(np.mean(ious)),
        "p_new_shape": float(np.mean(new_shape)),
        "gram": float(np.mean(grams)),
        "p_new_texture": float(np.mean(new_tex)),
        "p_ref_colour": float(np.mean(colour)),
        "control": float(np.mean(ctrl)),
    }


def run_case(host, judge, case: Case, seeds: list[int]) -> dict[str, float]:
    prompts = [p for p in case.prompts for _ in seeds]
    idx = [i for i in range(len(case.prompts)) for _ in seeds]
    images = generate(host, prompts, seeds * len(case.prompts))
    return score(judge, case, images, idx) | {"_images": images}  # type: ignore[dict-item]


def deltas(result) -> dict[str, torch.Tensor]:
    names = {t.kohya: t.name for t in result.targets}
    return {names[k]: m.delta() for k, m in result.lora_modules().items()}


METHODS = {
    "OSTAF hypernet (r4)": {"network": "hypernet", "rank": 4},
    "LoRA direct (r4)": {"network": "lora", "rank": 4},
    "full-rank LoRA (≈FT)": {"network": "lora", "rank": 64},
}


def train(host, case: Case, blocks: tuple[str, ...], steps: int, lr: float, seed: int, **kw):
    image, _ = world.render(case.spec)
    cfg = AttributeConfig(
        attribute=case.attribute, token=TOKEN, steps=steps, lr=lr, seed=seed, blocks=blocks, **kw
    )
    return train_attribute(host, image, cfg)


def benchmark(args) -> dict:
    host = DiffusersHost.load(None)
    judge = judges.load_judge(RESULTS / "judge.safetensors")
    seeds = list(range(args.samples))
    table: dict = {"settings": vars(args) | {"out": str(args.out)}, "runs": []}
    sheets: list[torch.Tensor] = []
    for cname, case in cases().items():
        base = run_case(host, judge, case, seeds)
        sheets.append(base.pop("_images"))
        table["runs"].append({"case": cname, "method": "base (λ=0)", "part": "-"} | base)
        print(cname, "base", _fmt(base), flush=True)
        for method, kw in METHODS.items():
            for part, blocks in (("encoder", ENCODER), ("decoder", DECODER)):
                t0 = time.time()
                res = train(host, case, blocks, args.steps, args.lr, args.seed, **kw)
                d = deltas(res)
                lambdas = args.lambdas if kw["network"] == "hypernet" else [1.0]
                for lam in lambdas:
                    host.patcher.apply([(f"{cname}-{method}-{part}", d, lam)])
                    try:
                        m = run_case(host, judge, case, seeds)
                    finally:
                        host.patcher.apply([])
                    images = m.pop("_images")
                    if lam == 1.0:
                        sheets.append(images)
                    row = {"case": cname, "method": method, "part": part, "lambda": lam}
                    row |= m | {
                        "train_s": round(res.seconds, 1),
                        "probe": [res.probe_loss_before, res.probe_loss_after],
                        "params": sum(p.numel() for p in res.network.parameters()),
                    }
                    table["runs"].append(row)
                    print(cname, method, part, lam, _fmt(m), f"{time.time() - t0:.0f}s", flush=True)
    _sheet(sheets, args.out.with_suffix(".png"), per_row=len(seeds) * 6)
    return table


def per_block(args) -> dict:
    """Train the hypernet on one attention block at a time (diagnosing the split)."""
    host = DiffusersHost.load(None)
    judge = judges.load_judge(RESULTS / "judge.safetensors")
    seeds = list(range(args.samples))
    rows = []
    for cname, case in cases().items():
        for block in (*ENCODER, "mid_block.attentions.0", *DECODER):
            res = train(host, case, (block,), args.steps, args.lr, args.seed, network="hypernet")
            host.patcher.apply([(f"{cname}-{block}", deltas(res), 1.0)])
            try:
                m = run_case(host, judge, case, seeds)
            finally:
                host.patcher.apply([])
            m.pop("_images")
            rows.append({"case": cname, "block": block} | m)
            print(cname, block, _fmt(m), flush=True)
    return {"settings": vars(args) | {"out": str(args.out)}, "per_block": rows}


def pick(args) -> None:
    """Score base-model checkpoints: judge accuracy on seen and held-out captions."""
    from lib_ostaf import tiny

    judge = judges.load_judge(RESULTS / "judge.safetensors")
    rng = np.random.default_rng(5)
    seen = [world.random_spec(rng) for _ in range(48)]
    held = [
        world.Spec(s, list(world.COLOURS)[i % 8], t, seed=i)
        for i, (s, t) in enumerate(world.HELD_OUT * 4)
    ]
    for ckpt in sorted(Path(args.pick).glob("ckpt_*.safetensors")):
        parts = tiny.components("sd1", world=True, weights=False)
        tiny.load_weights(parts, ckpt)
        host = DiffusersHost.from_components(parts, name=ckpt.stem)
        res = {}
        for label, specs in (("seen", seen), ("held_out", held)):
            imgs = generate(host, [world.caption(s) for s in specs], list(range(len(specs))))
            out = judge(imgs)
            res[label] = {
                k: float(
                    np.mean(
                        [
                            judges.HEADS[k][int(p)] == getattr(s, k)
                            for p, s in zip(out[k].argmax(1), specs, strict=True)
                        ]
                    )
                )
                for k in ("shape", "colour", "texture")
            }
        res["score"] = float(np.mean([v for r in res.values() for v in r.values()]))
        print(ckpt.name, json.dumps(res), flush=True)


def _fmt(m: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in m.items() if isinstance(v, float))


def _sheet(sheets: list[torch.Tensor], path: Path, per_row: int) -> None:
    imgs = torch.cat(sheets)
    n = imgs.shape[0]
    rows = (n + per_row - 1) // per_row
    canvas = torch.ones(3, rows * 17, per_row * 17)
    for i in range(n):
        r, c = divmod(i, per_row)
        canvas[:, r * 17 : r * 17 + 16, c * 17 : c * 17 + 16] = (imgs[i] + 1) / 2
    arr = (canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    img.resize((img.width * 4, img.height * 4), Image.Resampling.NEAREST).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=2, help="seeds per prompt")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pick", type=Path, default=None)
    ap.add_argument("--per-block", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "attribute_benchmark")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.pick:
        pick(args)
        return
    table = per_block(args) if args.per_block else benchmark(args)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=1, default=str))
    md = markdown(table)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out.with_suffix('.json')} and .md")


COLUMNS = {
    "shape": ("iou", "p_new_shape", "control", "gram"),
    "appearance": ("gram", "p_new_texture", "p_ref_colour", "control", "iou"),
}


def markdown(table: dict) -> str:
    """Methods × metrics per case, the encoder/decoder matrix and the λ sweep."""
    if "per_block" in table:
        lines = [
            "| case | block | IoU | new shape | Gram ↓ | new texture | control |",
            "|---" * 7 + "|",
        ]
        for r in table["per_block"]:
            lines.append(
                f"| {r['case']} | {r['block']} | {r['iou']:.2f} | {r['p_new_shape']:.2f} | "
                f"{r['gram']:.2f} | {r['p_new_texture']:.2f} | {r['control']:.2f} |"
            )
        return "\n".join(lines) + "\n"
    out = []
    runs = table["runs"]
    for case, cols in COLUMNS.items():
        out.append(f"\n**{case}** (reference: {_ref_name(case)})\n")
        out.append("| method | part | λ | " + " | ".join(cols) + " | train s |")
        out.append("|---" * (len(cols) + 4) + "|")
        for r in runs:
            if r["case"] == case and r.get("lambda", 1.0) == 1.0:
                vals = " | ".join(f"{r[c]:.2f}" for c in cols)
                lam = r.get("lambda", 0)
                out.append(
                    f"| {r['method']} | {r['part']} | {lam:g} | {vals} | {r.get('train_s', '')} |"
                )
    out.append("\n**λ sweep** (OSTAF hypernet, attribute's own part)\n")
    out.append("| case | λ | main metric | control |")
    out.append("|---|---|---|---|")
    for case, metric, part in (("shape", "iou", "encoder"), ("appearance", "gram", "decoder")):
        base = next(r for r in runs if r["case"] == case and r["method"].startswith("base"))
        out.append(f"| {case} | 0 | {metric} {base[metric]:.2f} | {base['control']:.2f} |")
        for r in runs:
            if r["case"] == case and r["method"].startswith("OSTAF") and r["part"] == part:
                out.append(
                    f"| {case} | {r['lambda']:g} | {metric} {r[metric]:.2f} | {r['control']:.2f} |"
                )
    return "\n".join(out) + "\n"


def _ref_name(case: str) -> str:
    s = cases()[case].spec
    return f"a {s.colour} {s.texture} {s.shape}"


if __name__ == "__main__":
    main()
