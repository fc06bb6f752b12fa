"""Generation cost of an adapter: P2 (sampling step) and P3 (activation) of docs/performance.md.

For the embedded tiny SD1 model and an SD1.5-shaped UNet (random weights, 16×16 latents =
128 px, and 32×32 = 256 px for P3), with a rank-4 adapter on the decoder attention
(appearance, what the tab trains by default) and on every attention layer:

* **P2** — one classifier-free-guidance UNet call (batch 2) with the adapter merged by
  :class:`~lib_ostaf.method.offsets.WeightPatcher` ÷ the same call without an adapter; also the
  forward-hook path (``OffsetHooks``) for comparison. Calls are interleaved, medians.
* **P3** — ``apply([adapter])`` + ``apply([])`` (merge, then the exact restore) ÷ one 20-step
  generation (20 CFG UNet calls); and re-applying an unchanged set (must cost ~nothing).

Ratios are measured in one run; nothing is asserted.

    python bench/generation_benchmark.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not __package__:  # python bench/generation_benchmark.py: see bench/_root.py
    import _root  # noqa: F401

from bench._root import ROOT
from bench.step_benchmark import SD15_UNET, UNetHost
from lib_ostaf.files.naming import inspect_unet
from lib_ostaf.method.offsets import OffsetHooks, WeightPatcher
from lib_ostaf.method.targets import TargetSpec, find_module, select_targets

GOAL_P2, GOAL_P3 = 1.01, 0.05
RANK = 4
SCOPES = {
    "decoder attention": [TargetSpec(attribute="appearance")],
    "all attention": [TargetSpec(attribute="shape", include_mid=True), TargetSpec("appearance")],
}


def load(name: str, latent: int) -> tuple[torch.nn.Module, dict[str, Any], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if name == "tiny":
        from lib_ostaf.hosts.diffusers_host import DiffusersHost

        host = DiffusersHost.load("tiny-sd1")
        unet, cond = host.unet, host.encode_prompt("a photo of a cat")
        latent = host.resolution // 8
    else:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET)
        cond = {"encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}
    unet.eval().requires_grad_(False)
    x = torch.randn(2, 4, latent, latent, generator=g)
    return unet, cond, x


def adapter(unet: torch.nn.Module, specs: list[TargetSpec]) -> tuple[dict, dict]:
    """A random rank-4 adapter on the specs' layers: modules and per-layer ΔW."""
    g = torch.Generator().manual_seed(1)
    info = inspect_unet(unet)
    targets = [t for spec in specs for t in select_targets(unet, spec, info)]
    modules = {t.kohya: find_module(unet, t.name) for t in targets}
    factors = {
        t.kohya: (
            torch.randn(RANK, t.in_features, generator=g) * 0.02,
            torch.randn(t.out_features, RANK, generator=g) * 0.02,
        )
        for t in targets
    }
    deltas = {k: up @ down for k, (down, up) in factors.items()}
    return modules, {"factors": factors, "deltas": deltas}


def median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(name: str, latent: int, reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    unet, cond, x = load(name, latent)
    host = UNetHost(unet, torch.ones(1000), "epsilon")
    cond2 = {"encoder_hidden_states": cond["encoder_hidden_states"].expand(2, -1, -1)}
    t = torch.tensor([500])

    @torch.no_grad()
    def call() -> None:
        host.predict_noise(x, t.expand(2), cond2)

    out: dict[str, Any] = {"model": name, "latent": x.shape[-1], "scopes": {}}
    linear = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    for scope, spec in SCOPES.items():
        modules, ad = adapter(unet, spec)
        names = {k: n for n, m in linear.items() for k, mm in modules.items() if mm is m}
        patcher = WeightPatcher(linear)
        term = [("bench", {names[k]: d for k, d in ad["deltas"].items()}, 1.0)]
        call()  # warm-up
        base, merged, hooked = [], [], []
        for _ in range(reps):  # interleaved: drift hits all three alike
            patcher.apply(term)  # each timed call follows a pass over the same weights
            merged.append(median_time(call, 1))
            patcher.apply([])
            base.append(median_time(call, 1))
            with OffsetHooks(modules) as hooks:
                hooks.factors = ad["factors"]
                hooked.append(median_time(call, 1))
        step = statistics.median(base)

        def activate(patcher: WeightPatcher = patcher, term: list = term) -> None:
            patcher.apply(term)
            patcher.apply([])

        act = median_time(activate, max(3, reps // 2))
        patcher.apply(term)
        again = median_time(lambda p=patcher, tm=term: p.apply(tm), max(3, reps // 2))
        patcher.apply([])
        res = {
            "layers": len(modules),
            "step_s": step,
            "p2_merged": statistics.median(merged) / step,
            "p2_hooks": statistics.median(hooked) / step,
            "activate_s": act,
            "reapply_s": again,
            "generation_s": 20 * step,
            "p3": act / (20 * step),
        }
        out["scopes"][scope] = res
        log(
            f"[{name} {x.shape[-1]}²] {scope}: P2 merged {res['p2_merged']:.3f}, hooks "
            f"{res['p2_hooks']:.3f}; P3 {res['p3']:.4f}"
        )
    return out


def report_head(title: str, meta: dict[str, Any]) -> list[str]:
    """The first lines of a timing benchmark's report (this one, schedule_benchmark): the
    title, then when, where and how ``timing_main`` ran it."""
    return [
        title,
        "",
        f"{meta['date']} · torch {meta['torch']} · {meta['cpu']} · {meta['threads']} thread(s)"
        f" · load {meta['loadavg_1min'][0]}→{meta['loadavg_1min'][1]} · `{meta['command']}`",
        "",
    ]


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        *report_head("# Generation benchmark (P2, P3)", meta),
        f"P2 goal ≤ {GOAL_P2} (merged weights: the same UNet call), P3 goal ≤ {GOAL_P3}.",
        "",
        "| model | latent | adapter on | layers | UNet call (CFG) | P2 merged | P2 hooks "
        "| activate+restore | re-apply same | P3 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for scope, s in r["scopes"].items():
            lines.append(
                f"| {r['model']} | {r['latent']}² | {scope} | {s['layers']} | "
                f"{s['step_s'] * 1e3:.1f} ms | **{s['p2_merged']:.3f}** | {s['p2_hooks']:.3f} | "
                f"{s['activate_s'] * 1e3:.1f} ms | {s['reapply_s'] * 1e6:.0f} µs | "
                f"**{s['p3']:.4f}** |"
            )
    return "\n".join(lines) + "\n"


def timing_main(
    argv: list[str] | None,
    doc: str,
    script: str,
    run_one: Callable[..., dict[str, Any]],
    report_fn: Callable[[list[dict[str, Any]], dict[str, Any]], str],
    plans: tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]],
) -> None:
    """The command line of a timing benchmark (this one, schedule_benchmark): ``plans`` =
    (quick, full) lists of (model, latent, repetitions); writes bench/results/<script>.md
    and .json unless --quick."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, few repetitions")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # A random-weight UNet's activations drift into subnormal floats, which x86 CPUs compute
    # ~10× slower; any weight change then moves the timing. GPUs flush them; so do we.
    denormals = torch.set_flush_denormal(True)
    started, load0 = time.perf_counter(), os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - started:6.1f}s {msg}", file=sys.stderr, flush=True)

    plan = plans[0] if args.quick else plans[1]
    results = [run_one(name, latent, reps, log) for name, latent, reps in plan]
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "flush_denormal": denormals,
        "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "command": f"python bench/{script}.py " + " ".join(argv or sys.argv[1:]),
    }
    text = report_fn(results, meta)
    print(text)
    out = args.out or (None if args.quick else ROOT / f"bench/results/{script}.md")
    if out is not None:
        out.write_text(text, encoding="utf-8")
        raw = {"meta": meta, "results": results}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    quick, full = [("tiny", 16, 8)], [("tiny", 16, 31), ("sd15", 16, 9), ("sd15", 32, 5)]
    timing_main(argv, __doc__, "generation_benchmark", run, report, (quick, full))


if __name__ == "__main__":
    main()
