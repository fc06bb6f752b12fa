"""Compose across images: the shape adapter of image A + the appearance adapter of image B.

Both adapters are trained as the attribute benchmark trains them (product defaults, same
seed and steps), each with its own placeholder token, so one prompt asks for both:
A = the blue solid moon (shape, token ``ostafv``: the single benchmark's shape adapter),
B = the red diagonal square (appearance, token ``ostafa``, a learned vector).

Four conditions on the same 12 prompts × 4 seeds (context words neither adapter carries:
four templates × the world's three styles, judged as ``control``):

* base — no weight deltas, B's token at λ = 0 (its init word, "object");
* shape A only — A's deltas at λ = 1, B's token at λ = 0;
* appearance B only — B's deltas and token at λ = 1, A's deltas off (its token as text);
* both — A's and B's deltas (summed where they share a layer) and B's token at λ = 1.

Every image is scored against both references with the attribute benchmark's judge and
metrics: shape fidelity ``p_new_shape`` (named moon), its leak ``gram_A`` (Gram distance
to A's object; ↓ = leak); appearance fidelity ``p_ref_colour`` (named red), its leak
``iou_B`` (silhouette IoU with B's square; ↑ = leak). Checks: each fidelity in "both" is
≥ 0.8 × alone, and each leak in "both" exceeds its leak alone by at most 0.05.

    python -m bench.compose_benchmark                 # → bench/results/, docs/compose.png
    python -m bench.compose_benchmark --quick --out DIR --picture DIR/compose.png
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench import attribute_benchmark as ab
from bench import judges
from lib_ostaf.hosts.diffusers_host import DiffusersHost
from lib_ostaf.method.targets import default_blocks
from lib_ostaf.method.train import TrainResult, train_attribute

ROOT = Path(__file__).resolve().parent
PICTURE = ROOT.parent / "docs" / "compose.png"
SINGLE = ab.RESULTS / "attribute_benchmark.json"  # each adapter alone on its own prompts
SHAPE_TOKEN = ab.TOKEN  # "ostafv": the single benchmark's shape adapter, unchanged
APP_TOKEN = "ostafa"  # spliced as one learned vector (the word itself is never tokenized)
TEMPLATES = (
    "a photo of a {a} textured {s} shaped object",
    "a {a} textured {s} shaped object",
    "a photo of a {a} {s} shaped object",
    "a photo of a {s} shaped object, {a} textured",
)
STYLES = ("flat", "outlined", "blurred")  # the world's style words ("flat" is not captioned)
# condition → (λ of A's shape deltas, λ of B's appearance deltas and token)
CONDITIONS = {
    "base": (0.0, 0.0),
    "shape A only": (1.0, 0.0),
    "appearance B only": (0.0, 1.0),
    "both": (1.0, 1.0),
}
ALONE = {"shape": "shape A only", "appearance": "appearance B only"}
# per attribute: (metric, higher = closer to the reference); leak = the *other* attribute
ROLES = {
    "shape": {"fidelity": ("p_new_shape", True), "leak": ("gram_A", False)},
    "appearance": {"fidelity": ("p_ref_colour", True), "leak": ("iou_B", True)},
}
FIDELITY_KEEP = 0.8  # both ≥ 0.8 × alone
LEAK_TOLERANCE = 0.05  # both's leak gain ≤ alone's + 0.05 (the single benchmark's limit)
QUICK_STEPS = 20
COLUMNS = ("p_new_shape", "iou_A", "gram_A", "colour_A", "p_ref_colour", "p_new_texture",
           "iou_B", "gram_B", "colour_B", "control")  # fmt: skip


def composed_prompts() -> tuple[tuple[str, ...], tuple[dict[str, str], ...]]:
    """12 prompts asking for both tokens; per prompt the style the judge should see."""
    ctx = [(t, st) for t in TEMPLATES for st in STYLES]
    prompts = tuple(
        t.format(a=APP_TOKEN, s=SHAPE_TOKEN) + ("" if st == "flat" else f", {st}") for t, st in ctx
    )
    return prompts, tuple({"style": st} for _, st in ctx)


def references(n_prompts: int) -> dict[str, ab.Reference]:
    """The benchmark's two references, asked the composed prompts."""
    prompts, others = composed_prompts()
    return {
        a: replace(r, prompts=prompts[:n_prompts], others=others[:n_prompts])
        for a, r in ab.builtin_references().items()
    }


def score(judge, refs: dict[str, ab.Reference], images: torch.Tensor, idx: list[int]) -> dict:
    """Every metric of each image against A (shape) and B (appearance), summarised."""
    a = ab.per_sample(judge, refs["shape"], images, idx)
    b = ab.per_sample(judge, refs["appearance"], images, idx)
    samples = {
        "p_new_shape": a["p_new_shape"],
        "iou_A": a["iou"],
        "gram_A": a["gram"],
        "colour_A": a["colour"],
        "p_ref_colour": b["p_ref_colour"],
        "p_new_texture": b["p_new_texture"],
        "iou_B": b["iou"],
        "gram_B": b["gram"],
        "colour_B": b["colour"],
        "control": a["control"],  # the style word (same prompts for both references)
    }
    return ab.summarise(samples)


def run_condition(
    host, judge, refs, adapters: dict[str, TrainResult], lams: tuple[float, float], seeds
) -> tuple[dict, torch.Tensor]:
    """Generate the prompts × seeds with A at ``lams[0]`` and B at ``lams[1]``; score."""
    lam_a, lam_b = lams
    shape, app = adapters["shape"], adapters["appearance"]
    host.patcher.apply(
        [("shape-A", ab.deltas(shape), lam_a), ("appearance-B", ab.deltas(app), lam_b)]
    )
    prompts = refs["shape"].prompts
    try:
        images = ab.generate(
            host,
            [p for p in prompts for _ in seeds],
            seeds * len(prompts),
            embeddings=ab.token_at(app, lam_b),
        )
    finally:
        host.patcher.apply([])
    idx = [i for i in range(len(prompts)) for _ in seeds]
    return score(judge, refs, images, idx), images


def train_both(host, refs, cfg) -> tuple[dict[str, TrainResult], dict[str, Any]]:
    """A's shape adapter and B's appearance adapter (defaults, own tokens); their layers."""
    tokens = {"shape": SHAPE_TOKEN, "appearance": APP_TOKEN}
    adapters = {
        a: train_attribute(host, refs[a].image, replace(cfg, attribute=a, token=tokens[a]))
        for a in ("shape", "appearance")
    }
    layers = {a: sorted(ab.deltas(r)) for a, r in adapters.items()}
    shared = sorted(set(layers["shape"]) & set(layers["appearance"]))
    info = {
        a: {
            "token": tokens[a],
            "blocks": list(default_blocks(host.unet, a)),
            "layers": len(layers[a]),
            "learned_token": bool(r.embeddings),
            "train_s": round(r.seconds, 1),
        }
        for a, r in adapters.items()
    }
    info["shared_layers"] = shared  # summed by the weight patcher if any
    info["disjoint"] = not shared
    return adapters, info


def compose(args) -> tuple[dict, dict[str, torch.Tensor], dict[str, ab.Reference]]:
    t0 = time.time()
    host = DiffusersHost.load(None)
    judge = judges.load_judge(ab.RESULTS / "judge.safetensors")
    cfg = ab.base_config(([f"steps={QUICK_STEPS}"] if args.quick else []) + args.set)
    refs = references(args.prompts)
    adapters, modules = train_both(host, refs, cfg)
    seeds = list(range(args.samples))
    rows, images = {}, {}
    for name, lams in CONDITIONS.items():
        rows[name], images[name] = run_condition(host, judge, refs, adapters, lams, seeds)
        print(name, ab._fmt(rows[name]), f"{time.time() - t0:.0f}s", flush=True)
    table = {
        "settings": {
            "model": "tiny-world",
            "config": ab._plain(cfg),
            "references": {
                "A (shape)": refs["shape"].name,
                "B (appearance)": refs["appearance"].name,
            },
            "prompts": list(refs["shape"].prompts),
            "samples_per_prompt": args.samples,
            "conditions": {k: {"lambda_A": a, "lambda_B": b} for k, (a, b) in CONDITIONS.items()},
            "roles": {a: {k: v[0] for k, v in r.items()} for a, r in ROLES.items()},
            "bootstrap": ab.BOOTSTRAP,
            "quick": args.quick,
        },
        "modules": modules,
        "rows": rows,
        "checks": checks(rows, modules["disjoint"], single_fidelity()),
        "seconds": round(time.time() - t0, 1),
    }
    return table, images, refs


def single_fidelity(path: Path = SINGLE) -> dict[str, dict]:
    """Each adapter's fidelity alone in the attribute benchmark (its own prompts, λ = 1)."""
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text())["runs"]
    out = {}
    for attr, roles in ROLES.items():
        key = roles["fidelity"][0]
        for r in runs:
            if r["case"] == attr and r["method"] == ab.DEFAULT and r["lambda"] == 1.0:
                out[attr] = {"alone": r[key], "alone_ci": r[f"{key}_ci"], "n": r["n"]}
    return out


def checks(rows: dict[str, dict], disjoint: bool, single: dict | None = None) -> dict[str, Any]:
    """Fidelity in "both" ≥ 0.8 × alone; leak gain in "both" ≤ alone's + tolerance.
    ``single``: the fidelity alone in the attribute benchmark, compared on the side."""
    base, both = rows["base"], rows["both"]
    out: dict[str, Any] = {
        "rule": {
            "fidelity": f"both >= {FIDELITY_KEEP} x alone (point estimates)",
            "leak": f"gain(both) - gain(alone) <= {LEAK_TOLERANCE}, gain = move towards the "
            "reference's other attribute relative to base (point estimates)",
        }
    }
    for attr, alone_name in ALONE.items():
        alone = rows[alone_name]
        fkey = ROLES[attr]["fidelity"][0]
        f = {"metric": fkey, "both": both[fkey], "alone": alone[fkey], "base": base[fkey],
             "both_ci": both[f"{fkey}_ci"], "alone_ci": alone[f"{fkey}_ci"]}  # fmt: skip
        f["ratio"] = both[fkey] / alone[fkey] if alone[fkey] else None
        f["pass"] = both[fkey] >= FIDELITY_KEEP * alone[fkey]
        if single and attr in single:  # other prompts: a side comparison, not the check
            alone_1 = single[attr]["alone"]
            f["vs_attribute_benchmark"] = single[attr] | {
                "ratio": both[fkey] / alone_1 if alone_1 else None,
                "pass": both[fkey] >= FIDELITY_KEEP * alone_1,
            }
        lkey, closer = ROLES[attr]["leak"]
        g_both, g_alone = ab.gain(both, base, lkey, closer), ab.gain(alone, base, lkey, closer)
        leak = {"metric": lkey, "higher_is_leak": closer, "both": both[lkey],
                "alone": alone[lkey], "base": base[lkey], "both_ci": both[f"{lkey}_ci"],
                "alone_ci": alone[f"{lkey}_ci"], "excess": g_both - g_alone,
                "tolerance": LEAK_TOLERANCE}  # fmt: skip
        leak["pass"] = leak["excess"] <= LEAK_TOLERANCE
        out[attr] = {"fidelity": f, "leak": leak}
    out["modules_disjoint"] = disjoint
    out["pass"] = all(out[a][k]["pass"] for a in ALONE for k in ("fidelity", "leak"))
    return out


# ------------------------------------------------------------------------------- output


def _tile(x: torch.Tensor, scale: int) -> Image.Image:
    arr = (((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def picture(
    images: dict[str, torch.Tensor], refs, samples: int, path: Path, rows: int = 4, scale: int = 6
) -> None:
    """Top: the references A and B; below, per prompt (first seed): one column per condition."""
    n_prompts = len(refs["shape"].prompts)
    picks = sorted({round(v) for v in np.linspace(0, n_prompts - 1, min(rows, n_prompts))})
    cell, label, pad = 16 * scale, 14, 4
    left = 70
    width = left + len(CONDITIONS) * (cell + pad)
    height = label + cell + pad + 2 * label + len(picks) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (text, ref) in enumerate(
        (("A: shape", refs["shape"]), ("B: appearance", refs["appearance"]))
    ):
        x = left + k * (cell + pad)
        draw.text((x, 0), text, fill=(0, 0, 0))
        canvas.paste(_tile(ref.grid, scale), (x, label))
    y0 = label + cell + pad
    for c, name in enumerate(CONDITIONS):
        draw.text((left + c * (cell + pad), y0 + label // 2), name, fill=(0, 0, 0))
    y0 += 2 * label
    for r, i in enumerate(picks):
        y = y0 + r * (cell + pad)
        draw.text((2, y + cell // 2 - 6), f"prompt {i + 1}", fill=(0, 0, 0))
        for c, name in enumerate(CONDITIONS):
            canvas.paste(_tile(images[name][i * samples], scale), (left + c * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _cell(row: dict, key: str) -> str:
    v, ci = row[key], row[f"{key}_ci"]
    return "–" if v is None else f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def markdown(table: dict) -> str:
    """Every condition × metric with its interval, then the checks."""
    rows = table["rows"]
    n = next(iter(rows.values()))["n"]
    out = [
        f"n = {n} samples per row ({len(table['settings']['prompts'])} prompts × "
        f"{table['settings']['samples_per_prompt']} seeds), 95 % bootstrap intervals\n",
        "| condition | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    out += [f"| {k} | " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for k, r in rows.items()]
    c = table["checks"]
    out.append("\n| check | both | alone | result |\n|---|---|---|---|")
    for attr in ALONE:
        f, leak = c[attr]["fidelity"], c[attr]["leak"]
        out.append(
            f"| {attr} fidelity ({f['metric']}) ≥ {FIDELITY_KEEP} × alone | {f['both']:.2f} | "
            f"{f['alone']:.2f} | {'✓' if f['pass'] else '✗'} |"
        )
        out.append(
            f"| {attr} leak ({leak['metric']}, {'↑' if leak['higher_is_leak'] else '↓'} = leak) "
            f"at most {LEAK_TOLERANCE} past alone | {leak['both']:.2f} | "
            f"{leak['alone']:.2f} | {'✓' if leak['pass'] else '✗'} (excess {leak['excess']:+.2f}) |"
        )
        side = f.get("vs_attribute_benchmark")
        if side:
            out.append(
                f"| (side) {attr} fidelity ≥ {FIDELITY_KEEP} × alone in the attribute benchmark "
                f"(its own prompts, n = {side['n']}) | {f['both']:.2f} | {side['alone']:.2f} | "
                f"{'✓' if side['pass'] else '✗'} (ratio {side['ratio']:.2f}) |"
            )
    out.append(f"\nadapters' layers disjoint: {c['modules_disjoint']}")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=4, help="seeds per prompt")
    ap.add_argument("--prompts", type=int, default=len(TEMPLATES) * len(STYLES))
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="AttributeConfig overrides"
    )
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, 1 seed, 2 prompts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ab.RESULTS, help="folder of the JSON")
    ap.add_argument(
        "--recheck", action="store_true", help="recompute the checks of the JSON in --out"
    )
    ap.add_argument("--picture", type=Path, default=PICTURE)
    args = ap.parse_args()
    if args.quick:
        args.samples, args.prompts = 1, 2
    if args.recheck:
        recheck(args.out / "compose_benchmark.json")
        return
    torch.set_num_threads(args.threads)
    table, images, refs = compose(args)
    write(table, images, refs, args)
    print(markdown(table))
    print(f"wrote compose_benchmark.json in {args.out.name}/ and {args.picture.name}")


def recheck(path: Path) -> None:
    """The checks again from a run's saved rows (nothing generated)."""
    table = json.loads(path.read_text())
    disjoint = table["modules"]["disjoint"]
    table["checks"] = checks(table["rows"], disjoint, single_fidelity())
    path.write_text(json.dumps(table, indent=1, default=str, ensure_ascii=False))
    print(markdown(table))


def write(table: dict, images: dict[str, torch.Tensor], refs, args) -> None:
    """The JSON (no machine paths) in ``args.out`` and the picture at ``args.picture``."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compose_benchmark.json").write_text(
        json.dumps(table, indent=1, default=str, ensure_ascii=False)
    )
    picture(images, refs, args.samples, args.picture)


if __name__ == "__main__":
    main()
