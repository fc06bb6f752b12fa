"""Both parts from one image, weighed apart: does each part's λ carry its attribute only?

One ``shape+appearance`` adapter is trained (product defaults) on one reference of the
attribute world, a **blue diagonal moon**: the moon is the shape the base model does not
know, blue its colour. Four dial settings, each on the attribute benchmark's two prompt
sets (12 prompts × 4 seeds each):

* shape prompts ("a photo of a red striped ostafv shaped object"): ``p_new_shape`` (the
  judge names the moon) and ``control`` (it names the prompt's colour and texture);
* appearance prompts ("a photo of a ostafv textured star"): ``p_ref_colour`` (the judge
  names blue) and ``control`` (it names the prompt's shape).

Dials (shape λ, appearance λ; the learned token follows the appearance λ): none (0, 0),
shape only (1, 0), appearance only (0, 1), both (1, 1). Checks: each dial carries its own
attribute (own ≥ 2 × other, the single benchmark's diagonal rule) and "both" keeps ≥ 0.8 of
each part's fidelity alone.

    python -m bench.parts_benchmark            # → bench/results/parts_benchmark.json
    python -m bench.parts_benchmark --quick --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench import attribute_benchmark as ab
from bench import judges
from lib_ostaf.hosts.diffusers_host import DiffusersHost
from lib_ostaf.method.embeddings import placeholder_at
from lib_ostaf.method.train import train_attribute
from lib_ostaf.world import attributes as world

REFERENCE = world.Spec("moon", "blue", "diagonal", cx=8, cy=8, radius=6.5, background=(240,) * 3)
DIALS = {  # name → (shape λ, appearance λ)
    "none": (0.0, 0.0),
    "shape only": (1.0, 0.0),
    "appearance only": (0.0, 1.0),
    "both": (1.0, 1.0),
}


def references() -> dict[str, ab.Reference]:
    image, mask = world.render(REFERENCE)
    name = f"a {REFERENCE.colour} {REFERENCE.texture} {REFERENCE.shape}"
    refs = {}
    for attribute in ("shape", "appearance"):
        prompts, others = ab.PROMPTS[attribute]()
        refs[attribute] = ab.Reference(
            name, attribute, image, mask, prompts, others, REFERENCE.colour
        )
    return refs


def part_deltas(result) -> dict[str, dict[str, torch.Tensor]]:
    """{part: {module name: ΔW}} from the trained result's ``parts``."""
    names = {t.kohya: t.name for t in result.targets}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, module in result.lora_modules().items():
        out.setdefault(result.parts[key], {})[names[key]] = module.delta()
    return out


def run(args) -> dict[str, Any]:
    host = DiffusersHost.load(None)
    judge = judges.load_judge(ab.RESULTS / "judge.safetensors")
    refs = references()
    cfg = replace(ab.base_config([]), attribute="shape+appearance")
    if args.quick:
        cfg = replace(cfg, steps=20)
        refs = {a: replace(r, prompts=r.prompts[:2], others=r.others[:2]) for a, r in refs.items()}
    t0 = time.time()
    result = train_attribute(host, refs["shape"].image, cfg)
    train_s = time.time() - t0
    deltas = part_deltas(result)
    seeds = list(range(args.samples))
    rows = []
    for dial, (lam_s, lam_a) in DIALS.items():
        host.patcher.apply(
            [("shape", deltas["shape"], lam_s), ("app", deltas["appearance"], lam_a)]
        )
        token = placeholder_at(result.embeddings, result.token_init, lam_a)
        try:
            for prompts, ref in refs.items():
                m, _ = ab.measure(host, judge, ref, seeds, embeddings=token)
                rows.append(
                    {"dial": dial, "shape": lam_s, "appearance": lam_a, "prompts": prompts} | m
                )
                print(dial, prompts, ab._fmt(m), flush=True)
        finally:
            host.patcher.apply([])
    return {
        "settings": {
            "model": "tiny-world",
            "reference": refs["shape"].name,
            "config": ab._plain(cfg),
            "samples_per_prompt": args.samples,
            "prompts_per_set": len(refs["shape"].prompts),
            "bootstrap": ab.BOOTSTRAP,
            "train_s": round(train_s, 1),
            "layers": {p: len(d) for p, d in deltas.items()},
        },
        "rows": rows,
        "checks": checks(rows),
    }


def _value(rows: list[dict], dial: str, prompts: str, key: str) -> float:
    return next(r[key] for r in rows if r["dial"] == dial and r["prompts"] == prompts)


def checks(rows: list[dict]) -> dict[str, Any]:
    shape = {d: _value(rows, d, "shape", "p_new_shape") for d in DIALS}
    colour = {d: _value(rows, d, "appearance", "p_ref_colour") for d in DIALS}
    return {
        "shape dial carries the shape (shape only ≥ 2 × appearance only)": [
            shape["shape only"], shape["appearance only"],
            shape["shape only"] >= 2 * shape["appearance only"] and shape["shape only"] > 0,
        ],
        "appearance dial carries the colour (appearance only ≥ 2 × shape only)": [
            colour["appearance only"], colour["shape only"],
            colour["appearance only"] >= 2 * colour["shape only"] and colour["appearance only"] > 0,
        ],
        "both keeps ≥ 0.8 of the shape alone": [
            shape["both"], shape["shape only"], shape["both"] >= 0.8 * shape["shape only"],
        ],
        "both keeps ≥ 0.8 of the colour alone": [
            colour["both"], colour["appearance only"],
            colour["both"] >= 0.8 * colour["appearance only"],
        ],
    }  # fmt: skip


def markdown(table: dict) -> str:
    s = table["settings"]
    lines = [
        f"One `shape+appearance` adapter on {s['reference']} (tiny-world, product defaults); "
        f"n = {s['samples_per_prompt'] * s['prompts_per_set']} per cell, 95 % bootstrap CI.",
        "",
        "| dial (shape λ, appearance λ) | prompts | p_new_shape | p_ref_colour | control "
        "| gram | iou |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        cells = [ab._cell(r, k) for k in ("p_new_shape", "p_ref_colour", "control", "gram", "iou")]
        dial = f"{r['dial']} ({r['shape']:g}, {r['appearance']:g})"
        lines.append(f"| {dial} | {r['prompts']} | " + " | ".join(cells) + " |")
    lines += ["", "| check | value | against | pass |", "|---|---|---|---|"]
    for name, (a, b, ok) in table["checks"].items():
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {'✓' if ok else '✗'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 steps, 2 prompts, 1 seed")
    ap.add_argument("--samples", type=int, default=4, help="seeds per prompt")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, default=ab.RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.samples = 1
    table = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parts_benchmark.json").write_text(json.dumps(table, indent=1) + "\n")
    text = markdown(table)
    (args.out / "parts_benchmark.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
