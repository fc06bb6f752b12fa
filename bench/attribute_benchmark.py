"""The attribute benchmark: does a one-image adapter carry its attribute, and only that?

Every adapter gets three numbers, each with a 95 % bootstrap interval over its samples:

* **fidelity** — its own attribute in new prompts. Shape: the rate the judge names the
  reference's shape (``p_new_shape``) and silhouette IoU; appearance: the rate it names
  the reference's colour (``p_ref_colour``) and texture (``p_new_texture``), the Gram
  distance and the colour-histogram distance to the reference's object.
* **leak** — the *other* attribute moving towards the reference. Appearance adapters:
  silhouette IoU against the reference's mask (↑ = leak); shape adapters: Gram and
  colour-histogram distance (↓ = leak).
* **control** — the judge's accuracy on the prompt's other words (the colour and texture
  a shape prompt asks for; the shape an appearance prompt asks for).

Built-in references (never seen by the base model ``tiny-world``): shape = a blue solid
crescent ("moon"); appearance = a red diagonal-striped square. Any image works too:

    python -m bench.attribute_benchmark                                   # → bench/results/
    python -m bench.attribute_benchmark --reference IMG.png [--mask M.png] \\
        --attribute shape|appearance [--samples N] --out DIR
    python -m bench.attribute_benchmark --quick --set lr=1e-3 steps=300   # default method only
    python -m bench.attribute_benchmark --per-block                       # one block at a time
    python -m bench.attribute_benchmark --pick runs/tiny                  # score base checkpoints

Label-free metrics (IoU, Gram, colour histogram) need only the reference and its mask
(automatic when none is given); for a ``--reference`` run the judge-class rates are null.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench import judges
from lib_ostaf.hosts.diffusers_host import DiffusersHost
from lib_ostaf.method.augment import make_views, object_mask
from lib_ostaf.method.embeddings import placeholder_at
from lib_ostaf.method.images import load_image, square
from lib_ostaf.method.masks import load_mask, resize_mask, square_mask
from lib_ostaf.method.targets import default_blocks
from lib_ostaf.method.train import AttributeConfig, diffusion_loss, frozen, train_attribute
from lib_ostaf.world import attributes as world

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TOKEN = AttributeConfig.token
METRICS = ("iou", "gram", "colour", "p_new_shape", "p_new_texture", "p_ref_colour", "control")
# Per attribute: (fidelity metric, leak metric, whether higher is "more like the reference").
ROLES = {
    "shape": {"fidelity": ("p_new_shape", True), "leak": ("gram", False)},
    "appearance": {"fidelity": ("p_ref_colour", True), "leak": ("iou", True)},
}
LABEL_FREE = {"p_new_shape": "iou", "p_ref_colour": "colour"}  # fidelity without a judge class
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Reference:
    """One reference image and the new prompts that ask for its attribute."""

    name: str
    attribute: str
    image: Image.Image  # square, at the model's resolution
    mask: np.ndarray  # the object on the world's 16×16 grid
    prompts: tuple[str, ...]
    others: tuple[dict[str, str], ...]  # per prompt: the judge's expected other words
    colour: str | None = None  # the judge's class of the reference colour (built-ins)
    train_mask: np.ndarray | None = None  # the user's mask at the image's size (None: auto)

    @property
    def grid(self) -> torch.Tensor:
        return judges.to_grid(self.image)


def shape_prompts() -> tuple[tuple[str, ...], tuple[dict[str, str], ...]]:
    ctx = [
        (c, t)
        for c in ("red", "yellow", "green", "purple")
        for t in ("striped", "checker", "dotted")
    ]
    return (
        tuple(f"a photo of a {c} {t} {TOKEN} shaped object" for c, t in ctx),
        tuple({"colour": c, "texture": t} for c, t in ctx),
    )


def appearance_prompts() -> tuple[tuple[str, ...], tuple[dict[str, str], ...]]:
    shapes = ("circle", "star", "triangle", "heart", "cross", "diamond")
    templates = ("a photo of a {token} textured {shape}", "a {token} textured {shape}")
    ctx = [(t, s) for t in templates for s in shapes]
    return (
        tuple(t.format(token=TOKEN, shape=s) for t, s in ctx),
        tuple({"shape": s} for _, s in ctx),
    )


PROMPTS = {"shape": shape_prompts, "appearance": appearance_prompts}


def builtin_references() -> dict[str, Reference]:
    moon = world.Spec("moon", "blue", "solid", cx=8, cy=8, radius=6.5, background=(240,) * 3)
    diag = world.Spec("square", "red", "diagonal", cx=8, cy=8, radius=7.4, background=(240,) * 3)
    refs = {}
    for attribute, spec in (("shape", moon), ("appearance", diag)):
        image, mask = world.render(spec)
        prompts, others = PROMPTS[attribute]()
        name = f"a {spec.colour} {spec.texture} {spec.shape}"
        refs[attribute] = Reference(name, attribute, image, mask, prompts, others, spec.colour)
    return refs


def user_reference(
    path: Path, attribute: str, mask_path: Path | None, resolution: int
) -> Reference:
    """A reference from the user's image (any size or mode) and optional mask."""
    raw = load_image(path)
    image = square(raw, resolution)
    given = None
    if mask_path is not None:
        given = square_mask(load_mask(mask_path, raw.size), resolution)
    full = object_mask(image) if given is None else given
    prompts, others = PROMPTS[attribute]()
    grid_mask = resize_mask(full, (world.GRID, world.GRID))
    name = Path(path).name
    return Reference(name, attribute, image, grid_mask, prompts, others, train_mask=given)


# ------------------------------------------------------------------------------ measuring


@torch.no_grad()
def generate(
    host: DiffusersHost, prompts: list[str], seeds: list[int], steps: int = 20, embeddings=None
):
    """Batched generation → (n, 3, 16, 16) in [-1, 1] (the world's grid)."""
    text: dict[str, Any] = {"prompt": prompts}
    if embeddings:
        text = {
            "prompt_embeds": torch.cat(
                [host.encode_prompt(p, embeddings)["encoder_hidden_states"] for p in prompts]
            ),
            "negative_prompt_embeds": host.encode_prompt("", embeddings)[
                "encoder_hidden_states"
            ].expand(len(prompts), -1, -1),
        }
    out = host.pipe(
        **text,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pt",
    ).images
    return F.avg_pool2d(out.float() * 2 - 1, world.SCALE)


def colour_histogram(x: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """The colour histogram of a (3, H, W) image in [-1, 1] over ``mask``."""
    return judges.colour_histogram(((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), mask)


colour_distance = judges.colour_distance


@torch.no_grad()
def per_sample(judge, ref: Reference, images: torch.Tensor, prompt_idx: list[int]) -> dict:
    """Each metric for each generated image (None where the reference has no judge class)."""
    ref_gram = judges.gram(judge, ref.grid, ref.mask)
    ref_hist = colour_histogram(ref.grid, ref.mask)
    ref_shape = judges.normalised(ref.mask)
    out = judge(images)
    pred = {k: [judges.HEADS[k][i] for i in out[k].argmax(1).tolist()] for k in out}
    rows: dict[str, list] = {m: [] for m in METRICS}
    builtin = ref.colour is not None  # judge classes exist only for the built-in references
    for j, i in enumerate(prompt_idx):
        mask = judges.foreground(images[j])
        rows["iou"].append(judges.iou(judges.normalised(mask), ref_shape))
        rows["gram"].append(judges.gram_distance(judges.gram(judge, images[j], mask), ref_gram))
        rows["colour"].append(colour_distance(colour_histogram(images[j], mask), ref_hist))
        rows["p_new_shape"].append(float(pred["shape"][j] == world.NEW_SHAPE) if builtin else None)
        rows["p_new_texture"].append(
            float(pred["texture"][j] == world.NEW_TEXTURE) if builtin else None
        )
        rows["p_ref_colour"].append(float(pred["colour"][j] == ref.colour) if builtin else None)
        rows["control"].append(float(np.mean([pred[k][j] == v for k, v in ref.others[i].items()])))
    return rows


def summarise(samples: dict[str, list], seed: int = 0) -> dict[str, Any]:
    """Mean of every metric and its 95 % percentile-bootstrap interval; ``n`` samples."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    n = len(samples["control"])
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    for key, values in samples.items():
        if any(v is None for v in values):
            out[key], out[f"{key}_ci"] = None, None
            continue
        v = np.asarray(values, float)
        boot = v[idx].mean(axis=1)
        out[key] = float(v.mean())
        out[f"{key}_ci"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    out["n"] = n
    return out


def measure(
    host, judge, ref: Reference, seeds: list[int], embeddings=None
) -> tuple[dict, torch.Tensor]:
    prompts = [p for p in ref.prompts for _ in seeds]
    idx = [i for i in range(len(ref.prompts)) for _ in seeds]
    images = generate(host, prompts, seeds * len(ref.prompts), embeddings=embeddings)
    return summarise(per_sample(judge, ref, images, idx)), images


# ------------------------------------------------------------------------------ methods


def all_attention_blocks(host) -> tuple[str, ...]:
    """Every attention block of the UNet (DreamBooth-style LoRA)."""
    return (*default_blocks(host.unet, "encoder"), *default_blocks(host.unet, "mid"),
            *default_blocks(host.unet, "decoder"))  # fmt: skip


def methods(host, attribute: str, base: AttributeConfig) -> dict[str, tuple[str, dict]]:
    """name → (part, config overrides). Same steps and learning rate for every method."""
    other = "appearance" if attribute == "shape" else "shape"
    own_blocks = default_blocks(host.unet, attribute)
    other_blocks = default_blocks(host.unet, other)
    paper_blocks = default_blocks(host.unet, PAPER_PART[attribute])
    full = max(max(m.in_features, m.out_features) for m in _linears(host.unet))
    return {
        "OSTAF hypernet (default)": ("own", {}),
        "OSTAF hypernet, other part": ("other", {"blocks": other_blocks}),
        "OSTAF hypernet, paper's part": (PAPER_PART[attribute], {"blocks": paper_blocks}),
        "LoRA direct (same rank)": ("own", {"network": "lora", "blocks": own_blocks}),
        "full-rank LoRA (same layers)": (
            "own",
            {"network": "lora", "rank": full, "blocks": own_blocks},
        ),
        "LoRA on every attention layer (DreamBooth-style)": (
            "all",
            {"network": "lora", "blocks": all_attention_blocks(host)},
        ),
    }


def _linears(unet) -> list[torch.nn.Linear]:
    return [m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and "attn" in n]


TI = "textual inversion (one token)"
TI_LR = 5e-3  # the usual textual-inversion rate; steps and views as every other method


def textual_inversion(host, ref: Reference, cfg: AttributeConfig) -> tuple[dict, float]:
    """One new token vector for ``cfg.token`` (init: "object"), nothing else trained."""
    t0 = time.time()
    encoder = host.text_encoders[0]
    vec = torch.nn.Parameter(encoder.word_vectors("object").mean(0, keepdim=True))
    views = make_views(ref.image, ref.attribute, cfg.n_views, cfg.seed, mask=ref.train_mask,
                       cell=host.resolution // world.GRID)  # fmt: skip
    with torch.no_grad():
        latents = torch.cat([host.encode_image(v) for v in views]).float()
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW([vec], lr=TI_LR, weight_decay=0.0)
    n_t = len(host.alphas_cumprod)
    with frozen(host.unet, encoder.model):
        for _ in range(cfg.steps):
            i = int(torch.randint(len(latents), (1,), generator=g))
            t = torch.randint(0, n_t, (1,), generator=g)
            noise = torch.randn(latents[i : i + 1].shape, generator=g)
            cond = host.encode_prompt(cfg.training_prompt, {cfg.token: [vec]})
            loss = diffusion_loss(host, latents[i : i + 1], noise, t, cond)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {cfg.token: [vec.detach()]}, time.time() - t0


def token_at(result, lam: float) -> dict | None:
    """The learned placeholder at intensity λ (v₀ + λ·(v − v₀), λ clamped to [0, 1]), as
    generation applies it (:func:`lib_ostaf.method.embeddings.scaled_embeddings`)."""
    if not result.embeddings:
        return None
    return placeholder_at(result.embeddings, result.token_init, lam)


def deltas(result) -> dict[str, torch.Tensor]:
    names = {t.kohya: t.name for t in result.targets}
    return {names[k]: m.delta() for k, m in result.lora_modules().items()}


def run_reference(host, judge, ref: Reference, args, base_cfg: AttributeConfig):
    """Base, then every method (λ sweep for the default): rows and the λ = 1 images."""
    seeds = list(range(args.samples))
    base, images = measure(host, judge, ref, seeds)
    rows = [{"case": ref.attribute, "method": "base (λ=0)", "part": "-", "lambda": 0.0} | base]
    sheet = [images]
    sweep = {0.0: images}
    print(ref.attribute, "base", _fmt(base), flush=True)
    chosen = methods(host, ref.attribute, base_cfg)
    if args.quick:
        chosen = {k: v for k, v in chosen.items() if k == DEFAULT}
    for method, (part, overrides) in chosen.items():
        cfg = replace(base_cfg, attribute=ref.attribute, **overrides)
        t0 = time.time()
        res = train_attribute(host, ref.image, cfg, mask=ref.train_mask)
        d = deltas(res)
        for lam in args.lambdas if method == DEFAULT else [1.0]:
            host.patcher.apply([(f"{ref.attribute}-{method}", d, lam)])
            try:
                m, images = measure(host, judge, ref, seeds, embeddings=token_at(res, lam))
            finally:
                host.patcher.apply([])
            if lam == 1.0:
                sheet.append(images)
            if method == DEFAULT:
                sweep[lam] = images
            rows.append(
                {"case": ref.attribute, "method": method, "part": part, "lambda": lam}
                | m
                | {
                    "train_s": round(res.seconds, 1),
                    "params": res.network.num_parameters(),
                    "offset_params": sum(a.numel() + b.numel() for a, b in res.factors().values()),
                }
            )
            print(ref.attribute, method, part, lam, _fmt(m), f"{time.time() - t0:.0f}s", flush=True)
    if not args.quick:
        emb, seconds = textual_inversion(host, ref, replace(base_cfg, attribute=ref.attribute))
        m, images = measure(host, judge, ref, seeds, embeddings=emb)
        sheet.append(images)
        dim = host.text_encoders[0].width
        row = {"case": ref.attribute, "method": TI, "part": "text", "lambda": 1.0} | m
        rows.append(row | {"train_s": round(seconds, 1), "params": dim, "offset_params": 0})
        print(ref.attribute, TI, _fmt(m), flush=True)
    _sweep_png(sweep, args.samples, args.out / f"attribute_sweep_{ref.attribute}.png")
    return rows, sheet


DEFAULT = "OSTAF hypernet (default)"
PAPER_PART = {"shape": "encoder", "appearance": "decoder"}  # the paper's wording


def base_config(settings: list[str]) -> AttributeConfig:
    """The product's defaults (``AttributeConfig()``) with ``--set key=value`` overrides."""
    cfg = AttributeConfig(token=TOKEN)
    types = {f.name: f.type for f in fields(AttributeConfig)}
    changes: dict[str, Any] = {}
    for item in settings:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set: unknown setting {key!r}")
        kind = str(types[key])
        if kind.startswith("bool"):
            changes[key] = value.lower() in ("1", "true", "yes")
        elif kind.startswith("int"):
            changes[key] = int(float(value))
        elif kind.startswith("float"):
            changes[key] = float(value)
        elif key in ("blocks", "attn", "proj"):
            changes[key] = tuple(v for v in value.split(",") if v) or None
        elif key == "timestep_range":
            changes[key] = tuple(float(v) for v in value.split(","))
        else:
            changes[key] = value
    return replace(cfg, **changes)


def benchmark(args) -> dict:
    host = DiffusersHost.load(None)
    judge = judges.load_judge(RESULTS / "judge.safetensors")
    cfg = base_config(args.set)
    if args.reference:
        refs = [user_reference(args.reference, args.attribute, args.mask, host.resolution)]
    else:
        refs = [r for a, r in builtin_references().items() if a in args.attributes]
    table: dict[str, Any] = {
        "settings": {
            "model": "tiny-world",
            "config": _plain(cfg),
            "samples_per_prompt": args.samples,
            "lambdas": args.lambdas,
            "bootstrap": BOOTSTRAP,
            "references": {r.attribute: r.name for r in refs},
            "roles": {a: {k: v[0] for k, v in r.items()} for a, r in ROLES.items()},
        },
        "runs": [],
    }
    sheets = []
    for ref in refs:
        rows, sheet = run_reference(host, judge, ref, args, cfg)
        table["runs"] += rows
        sheets += sheet
    args.out.mkdir(parents=True, exist_ok=True)
    _sheet(
        sheets, args.out / "attribute_benchmark.png", per_row=len(refs[0].prompts) * args.samples
    )
    table["checks"] = checks(table["runs"], label_free=bool(args.reference))
    return table


def _plain(cfg: AttributeConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


# ------------------------------------------------------------------------------- targets


def fidelity_key(case: str, label_free: bool) -> str:
    key = ROLES[case]["fidelity"][0]
    return LABEL_FREE[key] if label_free else key


def gain(row: dict, base: dict, key: str, higher_is_closer: bool) -> float:
    """How far ``row`` moved towards the reference on ``key`` (positive = closer)."""
    d = row[key] - base[key]
    return d if higher_is_closer else -d


def checks(runs: list[dict], label_free: bool = False) -> dict[str, Any]:
    """The issue's targets, evaluated on the default method (each with its numbers)."""
    out: dict[str, Any] = {}
    for case in ("shape", "appearance"):
        rows = [r for r in runs if r["case"] == case]
        if not rows:
            continue
        base = rows[0]
        own = next((r for r in rows if r["method"] == DEFAULT and r["lambda"] == 1.0), None)
        if own is None:
            continue
        fkey = fidelity_key(case, label_free)
        closer = fkey not in ("gram", "colour")
        lkey, lcloser = ROLES[case]["leak"]
        c: dict[str, Any] = {
            "fidelity": {"metric": fkey, "value": own[fkey], "base": base[fkey]},
            "leak": {"metric": lkey, "gain": gain(own, base, lkey, lcloser), "limit": 0.05},
            "control": {"value": own["control"], "base": base["control"]},
        }
        c["fidelity"]["pass"] = (own[fkey] >= 0.8) if not label_free else None
        c["leak"]["pass"] = c["leak"]["gain"] <= 0.05
        c["control"]["pass"] = own["control"] >= 0.9 * base["control"]
        other = next((r for r in rows if r["method"] == "OSTAF hypernet, other part"), None)
        if other is not None:
            g_own, g_other = gain(own, base, fkey, closer), gain(other, base, fkey, closer)
            c["diagonal"] = {
                "own_gain": g_own,
                "other_gain": g_other,
                "pass": g_own > 0 and g_own >= 2 * max(g_other, 0.0),
            }
        sweep = [base[fkey]] + [
            r[fkey] for r in sorted(rows, key=lambda r: r["lambda"]) if r["method"] == DEFAULT
        ]
        sign = 1 if closer else -1
        c["lambda"] = {
            "values": sweep,
            "pass": all(sign * (b - a) > 0 for a, b in itertools.pairwise(sweep)),
        }
        out[case] = c
    return out


def merge(dirs: list[Path]) -> dict:
    """One table from runs of single references (e.g. one process per attribute)."""
    tables = [json.loads((d / "attribute_benchmark.json").read_text()) for d in dirs]
    table = tables[0]
    for other in tables[1:]:
        table["runs"] += other["runs"]
        table["settings"]["references"] |= other["settings"]["references"]
    table["checks"] = checks(table["runs"])
    return table


# ---------------------------------------------------------------------------- other modes


def per_block(args) -> dict:
    """The default method on one attention block at a time (diagnosing where each lives)."""
    host = DiffusersHost.load(None)
    judge = judges.load_judge(RESULTS / "judge.safetensors")
    cfg = base_config(args.set)
    seeds = list(range(args.samples))
    rows = []
    for ref in builtin_references().values():
        for block in all_attention_blocks(host):
            res = train_attribute(
                host, ref.image, replace(cfg, attribute=ref.attribute, blocks=(block,))
            )
            host.patcher.apply([(f"{ref.attribute}-{block}", deltas(res), 1.0)])
            try:
                m, _ = measure(host, judge, ref, seeds)
            finally:
                host.patcher.apply([])
            rows.append({"case": ref.attribute, "block": block} | m)
            print(ref.attribute, block, _fmt(m), flush=True)
    return {
        "settings": {"config": _plain(cfg), "samples_per_prompt": args.samples},
        "per_block": rows,
    }


def pick(args) -> None:
    """Score base-model checkpoints: judge accuracy on seen and held-out captions."""
    from lib_ostaf.world import tiny

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


# ------------------------------------------------------------------------------- output


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
    img.resize((img.width * 3, img.height * 3), Image.Resampling.NEAREST).save(path)


def _sweep_png(sweep: dict[float, torch.Tensor], per_prompt: int, path: Path) -> None:
    """Rows: the first seed of each new prompt; columns: λ (0 = the base model)."""
    lams = sorted(sweep)
    n = sweep[lams[0]].shape[0] // per_prompt
    cells = [sweep[lam][i * per_prompt] for i in range(n) for lam in lams]
    path.parent.mkdir(parents=True, exist_ok=True)
    _sheet([torch.stack(cells)], path, per_row=len(lams))


def _cell(row: dict, key: str) -> str:
    v, ci = row.get(key), row.get(f"{key}_ci")
    if v is None:
        return "–"
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


COLUMNS = {
    "shape": ("p_new_shape", "iou", "gram", "colour", "control"),
    "appearance": ("p_ref_colour", "p_new_texture", "colour", "gram", "iou", "control"),
}


def markdown(table: dict) -> str:
    """Per reference: every method and metric with its interval; then the target checks."""
    if "per_block" in table:
        cols = ("iou", "p_new_shape", "gram", "colour", "p_ref_colour", "control")
        lines = ["| case | block | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for r in table["per_block"]:
            lines.append(
                f"| {r['case']} | {r['block']} | " + " | ".join(_cell(r, c) for c in cols) + " |"
            )
        return "\n".join(lines) + "\n"
    out = []
    runs = table["runs"]
    for case, cols in COLUMNS.items():
        rows = [r for r in runs if r["case"] == case]
        if not rows:
            continue
        ref = table["settings"]["references"][case]
        out.append(
            f"\n**{case}** (reference: {ref}; n = {rows[0]['n']} samples per row, 95 % bootstrap)\n"
        )
        out.append("| method | part | λ | " + " | ".join(cols) + " | train s | params |")
        out.append("|---" * (len(cols) + 5) + "|")
        for r in rows:
            vals = " | ".join(_cell(r, c) for c in cols)
            out.append(
                f"| {r['method']} | {r['part']} | {r['lambda']:g} | {vals} | "
                f"{r.get('train_s', '')} | {r.get('params', '')} |"
            )
    out.append("\n**Targets** (default method, λ = 1)\n")
    out.append("```\n" + json.dumps(table.get("checks", {}), indent=1) + "\n```")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reference", type=Path, help="an image of your own (any size or mode)")
    ap.add_argument(
        "--mask", type=Path, help="its object mask (white = object; default: automatic)"
    )
    ap.add_argument("--attribute", choices=tuple(ROLES), help="with --reference: what to learn")
    ap.add_argument(
        "--attributes", nargs="+", default=list(ROLES), help="built-in references to run"
    )
    ap.add_argument("--samples", type=int, default=4, help="seeds per prompt (12 prompts)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="AttributeConfig overrides"
    )
    ap.add_argument("--quick", action="store_true", help="only the default method")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pick", type=Path, default=None)
    ap.add_argument("--per-block", action="store_true")
    ap.add_argument("--merge", type=Path, nargs="+", help="combine runs of --attributes X")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.reference and not args.attribute:
        ap.error("--reference needs --attribute shape|appearance")
    if args.mask and not args.reference:
        ap.error("--mask goes with --reference")
    torch.set_num_threads(args.threads)
    if args.pick:
        pick(args)
        return
    if args.merge:
        table = merge(args.merge)
    else:
        table = per_block(args) if args.per_block else benchmark(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "attribute_per_block" if args.per_block else "attribute_benchmark"
    (args.out / f"{stem}.json").write_text(
        json.dumps(table, indent=1, default=str, ensure_ascii=False)
    )
    md = markdown(table)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and .md in {args.out.name}/")


if __name__ == "__main__":
    main()
