"""What a step schedule costs: a 20-step generation with one boundary ÷ the same without one.

Two adapters are merged: a shape-blocks one for the whole pass and a decoder one with
``end=0.5`` (one boundary, at step 10, where only its layers are restored). The
unscheduled run merges both before step 0 and restores after step 20; the scheduled one
asks :class:`~lib_ostaf.method.schedule.StepSchedule` before every step, as the hosts do, and
re-merges through :class:`~lib_ostaf.method.offsets.WeightPatcher` only when the set changes.
"Generation" = 20 classifier-free-guidance UNet calls (the sampler's own work is the same
in both). Runs are interleaved, medians; goal ≤ 1.05 (issue 16). Nothing is asserted.

    python bench/schedule_benchmark.py [--quick] [--threads N]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

if not __package__:  # python bench/schedule_benchmark.py: see bench/_root.py
    import _root  # noqa: F401

from bench.generation_benchmark import adapter, load, report_head, timing_main
from bench.step_benchmark import UNetHost
from lib_ostaf.method.offsets import WeightPatcher
from lib_ostaf.method.schedule import StepSchedule
from lib_ostaf.method.targets import TargetSpec

GOAL = 1.05
STEPS = 20


def terms(unet: torch.nn.Module, linear: dict) -> list[tuple[str, dict, float]]:
    """Two adapters as WeightPatcher terms: shape blocks (whole pass), decoder (scheduled)."""
    out = []
    for label, spec in (("shape", "shape"), ("appearance", "appearance")):
        modules, ad = adapter(unet, [TargetSpec(attribute=spec)])
        names = {k: n for n, m in linear.items() for k, mm in modules.items() if mm is m}
        out.append((label, {names[k]: d for k, d in ad["deltas"].items()}, 1.0))
    return out


def generation(call, patcher: WeightPatcher, both: list, windows: list | None) -> float:
    """Seconds for one 20-step pass; ``windows`` None = no schedule."""
    t0 = time.perf_counter()
    if windows is None:
        patcher.apply(both)
        for _ in range(STEPS):
            call()
    else:
        schedule = StepSchedule(both, windows)
        patcher.apply(schedule.first())
        for step in range(STEPS):
            on = schedule.at(step, STEPS)
            if on is not None:
                patcher.apply(on)
            call()
    patcher.apply([])
    return time.perf_counter() - t0


def run(name: str, latent: int, reps: int, log) -> dict[str, Any]:
    unet, cond, x = load(name, latent)
    host = UNetHost(unet, torch.ones(1000), "epsilon")
    cond2 = {"encoder_hidden_states": cond["encoder_hidden_states"].expand(2, -1, -1)}
    t = torch.tensor([500]).expand(2)

    @torch.no_grad()
    def call() -> None:
        host.predict_noise(x, t, cond2)

    linear = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    both = terms(unet, linear)
    patcher = WeightPatcher(linear)
    windows = [(0.0, 1.0), (0.0, 0.5)]
    call()  # warm-up
    plain, timed = [], []
    for _ in range(reps):  # interleaved
        plain.append(generation(call, patcher, both, None))
        timed.append(generation(call, patcher, both, windows))
    # what the boundary re-merged: the scheduled adapter's layers only
    schedule = StepSchedule(both, windows)
    patcher.apply(schedule.first())
    patcher.apply(schedule.at(STEPS // 2, STEPS) or [])
    touched = len(patcher.last_touched)
    patcher.apply([])
    res = {
        "model": name,
        "latent": x.shape[-1],
        "reps": reps,
        "layers": {label: len(d) for label, d, _ in both},
        "boundary_relayered": touched,
        "plain_s": statistics.median(plain),
        "scheduled_s": statistics.median(timed),
    }
    res["ratio"] = res["scheduled_s"] / res["plain_s"]
    log(f"[{name} {x.shape[-1]}²] ratio {res['ratio']:.4f}, boundary re-merged {touched} layers")
    return res


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        *report_head("# Step-schedule benchmark", meta),
        f"A {STEPS}-step generation with one boundary (decoder adapter `end=0.5`, shape "
        f"adapter all steps) ÷ the same two adapters without a schedule. Goal ≤ {GOAL}.",
        "",
        "| model | latent | runs | layers (shape / decoder) | re-merged at the boundary "
        "| without | with | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        layers = f"{r['layers']['shape']} / {r['layers']['appearance']}"
        lines.append(
            f"| {r['model']} | {r['latent']}² | {r['reps']} | {layers} | "
            f"{r['boundary_relayered']} | {r['plain_s']:.3f} s | {r['scheduled_s']:.3f} s | "
            f"**{r['ratio']:.3f}** |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    quick, full = [("tiny", 16, 3)], [("tiny", 16, 15), ("sd15", 16, 5)]
    timing_main(argv, __doc__, "schedule_benchmark", run, report, (quick, full))


if __name__ == "__main__":
    main()
