"""GPU check: one command, at most 8 minutes on one GPU, no downloads.

On random-weight SD1.5- and SDXL-shaped UNets (``UNet2DConditionModel`` from the
checkpoints' configs, as ``bench/memory_model.py`` and ``bench/step_benchmark.py`` build
them), with the project's own training step — ``OstafHypernet`` on the ``appearance``
attribute's target layers, ``OffsetHooks``, ``diffusion_loss``, ``run_steps`` under
``training_options`` (loss scaling for fp16 weights, gradient checkpointing), AdamW with
``AttributeConfig``'s defaults — it measures, per cell (model × 512²/1024² × fp16/bf16
weights × checkpointing off/on):

* **seconds per 100 training steps** (warm-up steps first, then timed steps, synchronised);
* **peak GPU memory** (``torch.cuda.max_memory_allocated``, the UNet's weights included)
  against ``bench/memory_model.py``'s prediction for the same option set (ratio to its
  SDPA/xformers column: PyTorch's SDPA is what diffusers runs on a GPU);

and, once per model at its native size, the **fp16-gradient check**: the relative error
‖g − g₃₂‖ / ‖g₃₂‖ of all factors' gradients on fp16 weights with loss scaling (the
``LossScaler`` of ``lib_ostaf.method.memory``), on fp16 without it, and on bf16, against an fp32
run of the same weights (TF32 off), as ``tests/test_half_precision.py`` does on the CPU.

A time guard stops starting new cells before ``--budget-s`` (default 400 s from the start
of the process, which leaves room for start-up and writing); the cells it skips are listed.
Results go to ``bench/results/gpu_check.json`` (no machine paths) and a short table to
stdout. ``--device cpu --tiny`` runs the same code on the tiny stand-in models of
``lib_ostaf.world.tiny``, each at its own size only (SD1.5's at 64² for 512², SDXL's at 128² for
1024²), with a handful of steps, in seconds (tested in tests/test_gpu_check.py).

    python bench/gpu_check.py                      # CUDA GPU, SD1.5 + SDXL shapes
    python bench/gpu_check.py --device cpu --tiny  # smoke run on the CPU
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the time guard counts from here, imports included

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

if not __package__:  # python bench/gpu_check.py: see bench/_root.py
    import _root  # noqa: F401

from bench._root import ROOT  # noqa: E402
from bench.memory_model import MODELS, build, pooled_dim, predict_row  # noqa: E402
from bench.step_benchmark import UNetHost  # noqa: E402
from lib_ostaf.errors import InputError  # noqa: E402
from lib_ostaf.files.naming import inspect_unet  # noqa: E402
from lib_ostaf.hosts.devices import choose_device  # noqa: E402
from lib_ostaf.hosts.diffusers_host import DiffusersHost  # noqa: E402
from lib_ostaf.method.hypernet import HypernetConfig, LayerShape, OstafHypernet  # noqa: E402
from lib_ostaf.method.memory import Precision, training_options  # noqa: E402
from lib_ostaf.method.offsets import OffsetHooks  # noqa: E402
from lib_ostaf.method.targets import find_module, select_targets  # noqa: E402
from lib_ostaf.method.train import (  # noqa: E402
    AttributeConfig,
    Callbacks,
    diffusion_loss,
    frozen,
    run_steps,
)

GIB = 2**30
DEFAULT_OUT = ROOT / "bench/results/gpu_check.json"
CONFIG = AttributeConfig(attribute="appearance")  # train_attribute's defaults
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SIZES = (512, 1024)
TINY_PX = {512: 64, 1024: 128}  # --tiny: 8² and 16² latents stand for 64² and 128²
# (model, size, with the gradient check): the sizes each model trains at first, then the
# other, so the time guard drops the least useful cells. --tiny runs the first two only.
PLAN = (("SD1.5", 512, True), ("SDXL", 1024, True), ("SD1.5", 1024, False), ("SDXL", 512, False))
GRAD_MAGNITUDE = 1e-3  # factors 0.001 · N(0, 1), as tests/test_half_precision.py
GRAD_T = 300


@dataclass(frozen=True)
class Shape:
    """A UNet to build: its diffusers config and its text conditioning (length, width)."""

    name: str
    config: dict[str, Any]
    ctx: tuple[int, int]


def shapes(tiny: bool) -> dict[str, Shape]:
    if tiny:
        from lib_ostaf.world import tiny as tiny_models

        sd1, sdxl = tiny_models.unet_config("sd1"), tiny_models.unet_config("sdxl")
        return {
            "SD1.5": Shape("SD1.5", sd1, (77, sd1["cross_attention_dim"])),
            "SDXL": Shape("SDXL", sdxl, (77, sdxl["cross_attention_dim"])),
        }
    return {name: Shape(name, cfg, (n, dim)) for name, (cfg, _, n, dim) in MODELS.items()}


class CheckHost(UNetHost):
    """``step_benchmark``'s bare-UNet host with ``DiffusersHost.predict_noise`` (which
    passes SDXL's added conditioning) and the family ``training_options`` needs."""

    predict_noise = DiffusersHost.predict_noise

    def __init__(self, unet: nn.Module) -> None:
        # SD1.5's scaled_linear schedule (SDXL's is the same), epsilon prediction.
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        super().__init__(unet, torch.cumprod(1.0 - betas, dim=0).float(), "epsilon")
        self.family = inspect_unet(unet).family


def conditioning(unet: nn.Module, shape: Shape, px: int, seed: int = 0) -> dict[str, Any]:
    """A random prompt conditioning in the UNet's dtype (SDXL: plus pooled text + time ids)."""
    g = torch.Generator().manual_seed(seed)
    dtype, device = unet.dtype, unet.device
    cond: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(1, *shape.ctx, generator=g).to(device, dtype)
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = torch.randn(1, pooled_dim(unet.config), generator=g)
        time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32)
        cond["added_cond_kwargs"] = {
            "text_embeds": pooled.to(device, dtype),
            "time_ids": time_ids.to(device, dtype),
        }
    return cond


def half_copy(unet32: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The same weights as ``unet32`` in ``dtype`` on ``device`` (one tensor at a time)."""
    with torch.device("meta"):
        twin = type(unet32).from_config(unet32.config)
    state = {k: v.to(device, dtype) for k, v in unet32.state_dict().items()}
    twin.load_state_dict(state, assign=True)
    return twin.eval().requires_grad_(False)


def targets_of(unet: nn.Module) -> tuple[list[LayerShape], dict[str, nn.Module]]:
    targets = select_targets(unet, CONFIG.target_spec())
    layers = [
        LayerShape(t.kohya, f"{t.attn}.{t.proj}", t.in_features, t.out_features) for t in targets
    ]
    return layers, {t.kohya: find_module(unet, t.name) for t in targets}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def strict_fp32() -> Iterator[None]:
    """No TF32 in matmuls or convolutions: the fp32 reference is fp32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# --------------------------------------------------------------------------- gradient check


def factor_grads(host: CheckHost, precision: Precision, shape: Shape, px: int) -> dict[str, Any]:
    """All factors' gradients of one diffusion loss through ``precision``'s backward (fp32
    factors, as in training). With a loss scaler, a step whose scaled gradients overflow is
    retried at the halved scale, as ``run_steps`` does over steps."""
    _, modules = targets_of(host.unet)
    g = torch.Generator().manual_seed(0)
    factors = {
        key: (
            (torch.randn(CONFIG.rank, m.in_features, generator=g) * GRAD_MAGNITUDE).to(host.device),
            (torch.randn(m.out_features, CONFIG.rank, generator=g) * GRAD_MAGNITUDE).to(
                host.device
            ),
        )
        for key, m in modules.items()
    }
    params = [p.requires_grad_() for pair in factors.values() for p in pair]
    optimizer = torch.optim.SGD(params, lr=0.0)  # only its param_groups are used
    latent = px // 8
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 1, 4, latent, latent, generator=g).to(host.device)
    cond = conditioning(host.unet, shape, px)
    t = torch.tensor([GRAD_T])
    retries = 0
    with frozen(host.unet), OffsetHooks(modules) as hooks:
        hooks.factors = factors
        while True:
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = diffusion_loss(host, x0, noise, t, cond)
            precision.backward(loss, optimizer)
            grads = torch.cat([p.grad.flatten() for p in params])
            if bool(torch.isfinite(grads).all()) or not precision.skip(loss) or retries > 24:
                break
            retries += 1
    scale = precision.scaler.scale if precision.scaler is not None else None
    return {"grads": grads.detach().float().cpu(), "scale": scale, "retries": retries}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def grad_check(unet32: nn.Module, shape: Shape, px: int, dtypes: list[str]) -> dict[str, Any]:
    device = unet32.device
    with strict_fp32():
        ref = factor_grads(CheckHost(unet32), Precision(None, device), shape, px)["grads"]
    out: dict[str, Any] = {
        "model": shape.name,
        "px": px,
        "timestep": GRAD_T,
        "factor_magnitude": GRAD_MAGNITUDE,
        "reference_zero_fraction": float((ref == 0).float().mean()),
    }
    for name in dtypes:
        dtype = DTYPES[name]
        unet = half_copy(unet32, device, dtype)
        host = CheckHost(unet)
        with training_options(unet, device, host.family, "auto", "off", compute_dtype=dtype) as p:
            runs = {name: factor_grads(host, p, shape, px)}
        if dtype == torch.float16:  # what the scaler fixes: the same without it
            runs["fp16_unscaled"] = factor_grads(host, Precision(None, device), shape, px)
        for label, run in runs.items():
            g = run["grads"]
            out[label] = {
                "rel_error": _rel(g, ref),
                "zero_fraction": float((g == 0).float().mean()),
                "finite": bool(torch.isfinite(g).all()),
                "loss_scale": run["scale"],
                "overflow_retries": run["retries"],
            }
        del unet, host
        _free(device)
    return out


# --------------------------------------------------------------------------- timing cells


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Trainer:
    """``train_attribute``'s step on a bare UNet: a random 'view' of ``n_views`` latents,
    a timestep in the attribute's range, ``network()`` → hooks → ``diffusion_loss``;
    ``run_steps`` does backward, loss scaling, the finite and zero checks and AdamW."""

    def __init__(self, unet: nn.Module, shape: Shape, px: int, n_views: int = 4) -> None:
        self.host = CheckHost(unet)
        layers, self.modules = targets_of(unet)
        torch.manual_seed(CONFIG.seed)
        net_cfg = HypernetConfig(rank=CONFIG.rank, code_dim=CONFIG.code_dim, hidden=CONFIG.hidden)
        self.network = OstafHypernet(layers, net_cfg).to(unet.device)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=CONFIG.lr_, weight_decay=0)
        g = torch.Generator().manual_seed(CONFIG.seed)
        latent = px // 8
        self.latents = torch.randn(n_views, 4, latent, latent, generator=g)
        self.cond = conditioning(unet, shape, px)
        n_train = len(self.host.alphas_cumprod)
        self.t_range = tuple(round(f * (n_train - 1)) for f in CONFIG.timesteps)
        self.generator = torch.Generator().manual_seed(CONFIG.seed)
        self.layers = len(layers)

    def step_loss(self, step: int) -> torch.Tensor:
        g, device = self.generator, self.host.device
        i = int(torch.randint(self.latents.shape[0], (1,), generator=g))
        t = torch.randint(self.t_range[0], self.t_range[1] + 1, (1,), generator=g)
        noise = torch.randn(self.latents[i : i + 1].shape, generator=g)
        self.hooks.factors = self.network()
        x0 = self.latents[i : i + 1].to(device)
        return diffusion_loss(self.host, x0, noise.to(device), t, self.cond)

    def run(self, steps: int, checkpointing: bool) -> tuple[float, list[float], float | None]:
        """``steps`` training steps; (seconds, losses, final loss scale)."""
        host = self.host
        options = training_options(
            host.unet,
            host.device,
            host.family,
            "auto",
            "on" if checkpointing else "off",
            compute_dtype=host.dtype,
        )
        with frozen(host.unet), OffsetHooks(self.modules) as self.hooks, options as precision:
            _sync(host.device)
            t0 = time.perf_counter()
            losses = run_steps(
                steps, self.step_loss, self.optimizer, Callbacks(), precision=precision
            )
            _sync(host.device)
            seconds = time.perf_counter() - t0
        scale = precision.scaler.scale if precision.scaler is not None else None
        return seconds, losses, scale


class Clock:
    """The time guard: seconds left before the budget, and what each kind of cell costs."""

    def __init__(self, budget_s: float, start: float) -> None:
        self.budget_s, self.start = budget_s, start
        self.per_step: dict[tuple[str, int, bool], float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def estimate(self, model: str, size: int, ckpt: bool, steps: int) -> float:
        """Seconds ``steps`` steps of this cell will take, from cells already measured (the
        other checkpointing setting, or the other size scaled by the pixel count)."""
        for key, factor in (
            ((model, size, ckpt), 1.0),
            ((model, size, not ckpt), 1.4 if ckpt else 1.0),
            *(((model, s, c), (size / s) ** 2) for s in SIZES for c in (ckpt, not ckpt)),
        ):
            if key in self.per_step:
                return self.per_step[key] * factor * steps
        return 0.0


def measure_cell(
    unet: nn.Module,
    shape: Shape,
    size: int,
    px: int,
    dtype: str,
    ckpt: bool,
    args: argparse.Namespace,
    clock: Clock,
    prediction: dict[str, Any],
) -> dict[str, Any]:
    device = unet.device
    cell: dict[str, Any] = {
        "model": shape.name,
        "size": size,
        "px": px,
        "dtype": dtype,
        "checkpointing": ckpt,
        "predicted_peak_gib": prediction["lean_peak_gib"],
        "predicted_peak_math_attention_gib": prediction["peak_gib"],
        "predicted_weights_gib": prediction["weights_gib"],
    }
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(unet, shape, px)
    cell["target_layers"] = trainer.layers
    warm_s, warm_losses, _ = trainer.run(args.warmup, ckpt)
    per_step = warm_s / args.warmup  # first steps include kernel selection: an over-estimate
    clock.per_step.setdefault((shape.name, size, ckpt), per_step)
    steps = min(args.steps, int(max(0.0, clock.left()) / per_step))
    if steps < min(2, args.steps):
        cell["skipped"] = (
            f"time guard: after the warm-up ({warm_s:.1f} s) too little time was left for "
            f"{min(2, args.steps)} timed steps"
        )
        steps = 0
    seconds, losses, scale = trainer.run(steps, ckpt) if steps else (0.0, [], None)
    if steps:
        clock.per_step[(shape.name, size, ckpt)] = seconds / steps
    cell.update(
        warmup_steps=args.warmup,
        warmup_s=warm_s,
        timed_steps=steps,
        timed_s=seconds,
        s_per_100_steps=100 * seconds / steps if steps else None,
        losses_finite=all(math.isfinite(x) for x in warm_losses + losses),
        loss_scale=scale,
    )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GIB
        cell["peak_gib"] = peak
        cell["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        cell["peak_ratio"] = peak / prediction["lean_peak_gib"]
    else:  # no allocator statistics on the CPU: the prediction stands alone
        cell.update(peak_gib=None, peak_reserved_gib=None, peak_ratio=None)
    del trainer
    return cell


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    for path, name in ((str(ROOT), "<repo>"), (sys.prefix, "<python>"), (str(Path.home()), "~")):
        text = text.replace(path, name)
    return text[:300]


def run_stage(
    shape: Shape,
    size: int,
    px: int,
    grad: bool,
    args: argparse.Namespace,
    device: torch.device,
    clock: Clock,
    out: dict[str, Any],
    log,
) -> None:
    cells = [(d, c) for d in args.dtypes for c in (False, True)]
    if clock.left() < args.stage_reserve_s:
        for d, c in cells:
            out["skipped"].append(_label(shape.name, size, d, c) + ": time guard (no stage start)")
        if grad:
            out["skipped"].append(f"{shape.name} {size}² gradient check: time guard")
        return
    t0 = time.perf_counter()
    unet32 = build(shape.config, str(device))  # fp32, seeded: the same weights every run
    log(f"{shape.name}: built in {time.perf_counter() - t0:.1f} s")
    if grad:
        try:
            check = grad_check(unet32, shape, px, args.dtypes)
            check["size"] = size
            out["grad_check"].append(check)
            log(f"{shape.name} {size}²: gradient check done")
        except Exception as exc:  # report and go on: one run must not lose the rest
            out["grad_check"].append({"model": shape.name, "size": size, "error": _error(exc)})
            log(f"{shape.name} {size}²: gradient check failed: {_error(exc)}")
        _free(device)
    unet32 = unet32.to("cpu")  # only the cell's copy on the GPU while measuring
    _free(device)
    predictions: dict[bool, dict[str, Any]] = {}
    meta = None
    for dtype in args.dtypes:
        if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            for c in (False, True):
                out["skipped"].append(_label(shape.name, size, dtype, c) + ": no bf16 on this GPU")
            continue
        unet = None
        for ckpt in (False, True):
            label = _label(shape.name, size, dtype, ckpt)
            need = clock.estimate(shape.name, size, ckpt, args.warmup + min(2, args.steps))
            if clock.left() < need + args.cell_reserve_s:
                out["skipped"].append(f"{label}: time guard ({clock.left():.0f} s left)")
                log(f"{label}: skipped (time guard)")
                continue
            try:
                if ckpt not in predictions:
                    meta = meta or build(shape.config, "meta").to(torch.float16)
                    predictions[ckpt] = predict_row(meta, shape.name, px, shape.ctx, ckpt)
                if unet is None:
                    unet = half_copy(unet32, device, DTYPES[dtype])
                cell = measure_cell(
                    unet, shape, size, px, dtype, ckpt, args, clock, predictions[ckpt]
                )
            except Exception as exc:
                cell = {"model": shape.name, "size": size, "px": px, "dtype": dtype}
                cell.update(checkpointing=ckpt, error=_error(exc))
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    unet = None  # start the next cell from a clean allocator
                _free(device)
            out["cells"].append(cell)
            if cell.get("skipped"):
                out["skipped"].append(f"{label}: {cell['skipped']}")
            log(f"{label}: {_cell_text(cell)}")
        del unet
        _free(device)
    del unet32
    _free(device)


def _label(model: str, size: int, dtype: str, ckpt: bool) -> str:
    return f"{model} {size}² {dtype} checkpointing {'on' if ckpt else 'off'}"


def _cell_text(cell: dict[str, Any]) -> str:
    if "error" in cell:
        return f"error: {cell['error']}"
    s = cell["s_per_100_steps"]
    text = f"{s:.1f} s/100 steps" if s is not None else "not timed"
    if cell["peak_gib"] is not None:
        text += f", peak {cell['peak_gib']:.2f} GiB ({cell['peak_ratio']:.2f} × predicted)"
    return text


def _num(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def table(out: dict[str, Any]) -> str:
    lines = [
        f"GPU check on {out['meta']['device']} ({'tiny stand-ins' if out['meta']['tiny'] else 'SD1.5/SDXL shapes, random weights'}), "  # noqa: E501
        f"{out['meta']['seconds']:.0f} s",
        "",
        "| model | size | weights | ckpt | s / 100 steps | peak GiB | predicted GiB | ratio |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for c in out["cells"]:
        if "error" in c:
            lines.append(
                f"| {c['model']} | {c['size']}² | {c['dtype']} | "
                f"{'on' if c['checkpointing'] else 'off'} | error: {c['error'][:60]} | | | |"
            )
            continue
        ckpt = "on" if c["checkpointing"] else "off"
        lines.append(
            f"| {c['model']} | {c['size']}² | {c['dtype']} | {ckpt}"
            f" | {_num(c['s_per_100_steps'], '.1f')} | {_num(c['peak_gib'], '.2f')}"
            f" | {c['predicted_peak_gib']:.2f} | {_num(c['peak_ratio'], '.2f')} |"
        )
    lines += [
        "",
        "| model | size | fp16 + loss scaling | fp16 unscaled (zeros) | bf16 | loss scale |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for g in out["grad_check"]:
        if "error" in g:
            lines.append(f"| {g['model']} | {g['size']}² | error: {g['error'][:80]} | | | |")
            continue
        f16, raw, b16 = g.get("fp16"), g.get("fp16_unscaled"), g.get("bf16")
        zeros = f" ({raw['zero_fraction']:.0%})" if raw else ""
        lines.append(
            f"| {g['model']} | {g['size']}² | {_pct(f16)} | "
            f"{_pct(raw)}{zeros} | {_pct(b16)} | "
            f"{_num(f16 and f16['loss_scale'], '.0f')} |"
        )
    if out["skipped"]:
        lines += ["", "Skipped:", *(f"- {s}" for s in out["skipped"])]
    return "\n".join(lines) + "\n"


def _pct(run: dict[str, Any] | None) -> str:
    return "—" if run is None else f"{run['rel_error']:.2%}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu, auto (default cuda)")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny stand-in models, 64²/128² (a CPU smoke run)"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    ap.add_argument("--budget-s", type=float, default=400.0, help="start no cell after this")
    ap.add_argument("--steps", type=int, help="timed steps per cell (default 20; --tiny 2)")
    ap.add_argument("--warmup", type=int, help="untimed steps per cell (default 3; --tiny 1)")
    ap.add_argument("--dtypes", default="fp16,bf16", help="weights dtypes (fp16,bf16)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or any(d not in DTYPES for d in args.dtypes):
        ap.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be ≥ 1")
    # Below this a stage (model build + gradient check) or a cell is not started.
    args.stage_reserve_s = 5.0 if args.tiny else 45.0
    args.cell_reserve_s = 1.0 if args.tiny else 10.0
    try:
        device = choose_device(args.device)
    except InputError as exc:
        ap.exit(2, f"error: {exc}\n")
    if device.type == "mps":
        ap.exit(2, "error: the GPU check measures CUDA memory; use a CUDA GPU or --device cpu\n")

    import diffusers

    diffusers.logging.set_verbosity_error()  # "modules that should be kept in float32: []"

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - START:6.1f}s {msg}", file=sys.stderr, flush=True)

    out: dict[str, Any] = {"meta": {}, "cells": [], "grad_check": [], "skipped": []}
    # As a command the budget counts from the process's start; main(argv) from its call.
    clock = Clock(args.budget_s, START if argv is None else time.perf_counter())
    models = shapes(args.tiny)
    for name, size, grad in PLAN[:2] if args.tiny else PLAN:
        px = TINY_PX[size] if args.tiny else size
        run_stage(models[name], size, px, grad, args, device, clock, out, log)

    command = f"python bench/gpu_check.py --device {args.device}" + " --tiny" * args.tiny
    if args.budget_s != 400.0:
        command += f" --budget-s {args.budget_s:g}"
    out["meta"] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "budget_s": args.budget_s,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "attribute": CONFIG.attribute,
        "rank": CONFIG.rank,
        "prediction": "bench/memory_model.py, SDPA/xformers column (lean_peak_gib)",
        "seconds": round(clock.elapsed(), 1),
    }
    text = table(out)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {args.out.name}")
    return out


if __name__ == "__main__":
    main()
