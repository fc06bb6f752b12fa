"""OSTAF training step vs a plain peft LoRA on the same layers and rank.

For each model (the embedded tiny SD1 model; an SD1.5-shaped UNet with random weights at
16×16 latents) and each method

* ``ostaf``  — ``OstafHypernet`` + ``OffsetHooks``, i.e. one step of ``train_attribute``;
* ``direct`` — ``DirectLoRA`` through the same hooks (isolates the hypernetwork's cost);
* ``peft``   — peft LoRA injected into the same Linear layers (``unet.add_adapter``);

and, timed only, ``ostaf_per_layer`` — OSTAF with the hypernetwork's forward as it was
before each head ran once per width (two head calls per layer; :class:`PerLayerHeads`), so
the report shows what that change bought, this measures the training-step time (methods
interleaved in one process, medians), the peak RSS (one fresh subprocess per method) and
the exported file sizes. Targets are the ``appearance`` attribute's (decoder attention
q/k/v/out), rank 4, AdamW, the same latents, noise and timesteps for every method. Ratios
are against peft in the same run; nothing is asserted. Linux (peak RSS is read from
/proc). See docs/performance.md.

    python bench/step_benchmark.py [--quick] [--models tiny,sd15] [--steps N] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

if not __package__:  # python bench/step_benchmark.py: see bench/_root.py
    import _root  # noqa: F401

from bench._root import ROOT
from lib_ostaf.files.adapter_file import LoraModule, save_adapter
from lib_ostaf.files.metadata import build_metadata
from lib_ostaf.files.naming import UNetInfo, inspect_unet
from lib_ostaf.method.hypernet import (
    DirectLoRA,
    HypernetConfig,
    LayerShape,
    OstafHypernet,
)
from lib_ostaf.method.offsets import OffsetHooks
from lib_ostaf.method.targets import Target, find_module, select_targets
from lib_ostaf.method.train import AttributeConfig, TrainResult, diffusion_loss, export

METHODS = ("ostaf", "direct", "peft")
# Timed only: OSTAF with the previous hypernetwork forward (one head call per layer).
TIMED = (*METHODS, "ostaf_per_layer")
LABELS = {
    "ostaf": "OSTAF (hypernet+hooks)",
    "direct": "DirectLoRA (hooks)",
    "peft": "peft LoRA",
    "ostaf_per_layer": "OSTAF, per-layer heads (before)",
}
MODELS = ("tiny", "sd15")
CONFIG = AttributeConfig(attribute="appearance", rank=4)  # train_attribute's defaults
GOAL_TIME, GOAL_RSS = 1.10, 1.05
SEED = 0
LATENT = 16  # 16×16 latents = 128 px for both models

# diffusers' UNet2DConditionModel config of runwayml/stable-diffusion-v1-5 (random init here).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

# Per model: (warm-up rounds, timed rounds, steps in each RSS subprocess).
DEFAULT_STEPS = {"tiny": (5, 60, 8), "sd15": (2, 6, 3)}
QUICK_STEPS = {"tiny": (2, 8, 3), "sd15": (1, 2, 2)}


# --------------------------------------------------------------------------- models


class UNetHost:
    """The part of the Host protocol ``diffusion_loss`` uses, for a bare SD1 UNet.

    ``predict_noise`` is ``DiffusersHost.predict_noise`` for SD1 (no added conditioning).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str):
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.device = unet.device
        self.dtype = unet.dtype

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]):
        hidden = cond["encoder_hidden_states"].expand(x_t.shape[0], -1, -1)
        return self.unet(x_t, t, encoder_hidden_states=hidden).sample


@dataclass
class Model:
    """A loaded UNet plus the fixed training inputs every method gets."""

    name: str
    unet: nn.Module
    alphas_cumprod: torch.Tensor
    prediction_type: str
    cond: dict[str, Any]
    x0: torch.Tensor  # [1, 4, 16, 16]
    info: UNetInfo
    targets: list[Target]
    samples: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (noise, t)

    def host(self, unet: nn.Module) -> UNetHost:
        return UNetHost(unet, self.alphas_cumprod, self.prediction_type)

    def twin(self) -> nn.Module:
        """Another instance of the UNet sharing every weight tensor (no extra memory)."""
        with torch.device("meta"):
            twin = type(self.unet).from_config(self.unet.config)
        twin.load_state_dict(self.unet.state_dict(), assign=True)
        return twin.eval().requires_grad_(False)


def load_model(name: str, n_samples: int) -> Model:
    if name == "tiny":
        from lib_ostaf.cli import DEMO_IMAGE
        from lib_ostaf.hosts.diffusers_host import DiffusersHost
        from lib_ostaf.method.images import load_image, square

        host = DiffusersHost.load("tiny-sd1")
        cond = host.encode_prompt(CONFIG.training_prompt)
        x0 = host.encode_image(square(load_image(DEMO_IMAGE), host.resolution)).float()
        unet, alphas, prediction = host.unet, host.alphas_cumprod, host.prediction_type
    elif name == "sd15":
        from diffusers import UNet2DConditionModel

        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**SD15_UNET)
        g = torch.Generator().manual_seed(SEED)
        cond = {"encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}
        x0 = torch.randn(1, 4, LATENT, LATENT, generator=g)
        # SD1.5's scaled_linear schedule, epsilon prediction.
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas = torch.cumprod(1.0 - betas, dim=0).float()
        prediction = "epsilon"
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    unet.eval().requires_grad_(False)
    info = inspect_unet(unet)
    targets = select_targets(unet, CONFIG.target_spec(), info)
    g = torch.Generator().manual_seed(SEED + 1)
    samples = [
        (torch.randn(x0.shape, generator=g), torch.randint(0, len(alphas), (1,), generator=g))
        for _ in range(n_samples)
    ]
    return Model(name, unet, alphas, prediction, cond, x0, info, targets, samples)


# --------------------------------------------------------------------------- methods


class Method:
    """One way of training the target layers; ``step`` is one full optimiser step (loss,
    backward, AdamW on ``trainable``)."""

    name: str
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer

    def __init__(self, model: Model, unet: nn.Module) -> None:
        self.model = model
        self.host = model.host(unet)

    def _loss(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(self.host, self.model.x0, noise, t, self.model.cond)

    def step(self, noise: torch.Tensor, t: torch.Tensor) -> float:
        loss = self._loss(noise, t)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable)


class PerLayerHeads(OstafHypernet):
    """``OstafHypernet``'s forward as it was before each head ran once per width: both heads
    are applied to every layer's feature separately (2 head calls per layer, 144 on SD1.5).
    Same parameters and factors; the equality is tested in
    ``tests/test_hypernet_offsets.py::test_batched_heads_equal_per_layer_heads``."""

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        r = self.config.rank
        features = self.trunk(self.codes + self.kind_embedding(self.kind_ids))
        factors = {}
        for i, layer in enumerate(self.layers):
            n_in, n_out = layer.in_features, layer.out_features
            down = self.down_heads[str(n_in)](features[i]).view(r, n_in) / math.sqrt(n_in)
            up = self.up_heads[str(n_out)](features[i]).view(n_out, r)
            factors[layer.key] = (down, up)
        return factors


FACTOR_NETWORKS: dict[str, type[nn.Module]] = {
    "ostaf": OstafHypernet,
    "direct": DirectLoRA,
    "ostaf_per_layer": PerLayerHeads,
}


class HookMethod(Method):
    """``train_attribute``'s step: factors from the network → OffsetHooks → loss → AdamW."""

    def __init__(self, model: Model, unet: nn.Module, name: str) -> None:
        super().__init__(model, unet)
        self.name = name
        layers = [
            LayerShape(t.kohya, f"{t.attn}.{t.proj}", t.in_features, t.out_features)
            for t in model.targets
        ]
        cfg = HypernetConfig(rank=CONFIG.rank, code_dim=CONFIG.code_dim, hidden=CONFIG.hidden)
        torch.manual_seed(SEED)
        self.network = FACTOR_NETWORKS[name](layers, cfg)
        self.hooks = OffsetHooks({t.kohya: find_module(unet, t.name) for t in model.targets})
        self.trainable = list(self.network.parameters())
        self.optimizer = torch.optim.AdamW(self.trainable, lr=CONFIG.lr_, weight_decay=0.0)

    def step(self, noise: torch.Tensor, t: torch.Tensor) -> float:
        self.hooks.factors = self.network()
        return super().step(noise, t)

    def lora_modules(self) -> dict[str, LoraModule]:
        with torch.no_grad():
            factors = self.network().items()
            return {
                k: LoraModule(a.contiguous(), b.contiguous(), a.shape[0]) for k, (a, b) in factors
            }


class PeftMethod(Method):
    """peft LoRA (module replacement) on exactly the same Linear layers, r = alpha = 4."""

    name = "peft"

    def __init__(self, model: Model, unet: nn.Module) -> None:
        super().__init__(model, unet)
        from peft import LoraConfig

        torch.manual_seed(SEED)
        names = [t.name for t in model.targets]
        unet.add_adapter(
            LoraConfig(
                r=CONFIG.rank, lora_alpha=CONFIG.rank, lora_dropout=0.0, target_modules=names
            )
        )
        self.unet = unet
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        wrapped = [n for n, m in unet.named_modules() if hasattr(m, "lora_A") and n in set(names)]
        if len(wrapped) != len(names) or len(self.trainable) != 2 * len(names):
            raise RuntimeError("peft did not wrap exactly the OSTAF target layers")
        self.optimizer = torch.optim.AdamW(self.trainable, lr=CONFIG.lr_, weight_decay=0.0)

    def lora_modules(self) -> dict[str, LoraModule]:
        """peft's A/B as kohya modules under the same keys (alpha = r → scale 1)."""
        out = {}
        for t in self.model.targets:
            layer = self.unet.get_submodule(t.name)
            out[t.kohya] = LoraModule(
                down=layer.lora_A["default"].weight.detach().contiguous(),
                up=layer.lora_B["default"].weight.detach().contiguous(),
                alpha=float(CONFIG.rank),
            )
        return out


def make_method(name: str, model: Model, unet: nn.Module) -> Method:
    return PeftMethod(model, unet) if name == "peft" else HookMethod(model, unet, name)


# --------------------------------------------------------------------------- memory


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_worker(model_name: str, method: str, steps: int) -> dict[str, Any]:
    """In a fresh process: load, reset the peak counter, set up ``method``, run ``steps``."""
    model = load_model(model_name, steps)
    gc.collect()
    hwm_reset = reset_peak_rss()
    rss_loaded = _status_kib("VmRSS")
    runner = make_method(method, model, model.unet)
    for noise, t in model.samples:
        runner.step(noise, t)
    peak = _status_kib("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": model_name,
        "method": method,
        "steps": steps,
        "hwm_reset": hwm_reset,
        "rss_loaded_kib": rss_loaded,
        "peak_kib": peak,  # peak during setup + training (incl. the loaded model)
        "lifetime_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def measure_rss(model_name: str, method: str, steps: int) -> dict[str, Any]:
    job = f"{model_name}:{method}:{steps}:{torch.get_num_threads()}"
    cmd = [sys.executable, __file__, "--rss-worker", job]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS worker {model_name}/{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- timing + files


Times = dict[str, dict[str, list[float]]]  # method → {"wall": [s, …], "cpu": [s, …]}


def time_steps(model: Model, warmup: int, timed: int) -> tuple[dict[str, Method], Times]:
    """Interleaved rounds (order rotated each round): wall and CPU seconds per timed step.

    Each method gets its own UNet instance sharing the base weights, so hooks and peft's
    module replacement never see each other.
    """
    runners = {m: make_method(m, model, model.twin()) for m in TIMED}
    times: Times = {m: {"wall": [], "cpu": []} for m in TIMED}
    for k in range(warmup + timed):
        noise, t = model.samples[k]
        shift = k % len(TIMED)
        for m in TIMED[shift:] + TIMED[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            loss = runners[m].step(noise, t)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if not loss == loss:  # NaN would mean a broken setup, not a slow one
                raise RuntimeError(f"{m}: loss is NaN at round {k}")
            if k >= warmup:
                times[m]["wall"].append(wall)
                times[m]["cpu"].append(cpu)
    return runners, times


def factor_network_times(runners: dict[str, Method], reps: int = 20) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each factor network alone (forward + backward of every
    factor with unit output gradients), networks interleaved. The CPU time is the steadier
    number on a shared machine: a few-ms job is often preempted part-way."""
    networks = {r.name: r.network for r in runners.values() if isinstance(r, HookMethod)}
    with torch.no_grad():
        grads = [torch.ones_like(t) for pair in networks["ostaf"]().values() for t in pair]
    times: Times = {name: {"wall": [], "cpu": []} for name in networks}
    for _ in range(reps):
        for name, net in networks.items():
            wall, cpu = time.perf_counter(), time.process_time()
            outputs = [t for pair in net().values() for t in pair]
            torch.autograd.backward(outputs, grads)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    for net in networks.values():
        net.zero_grad(set_to_none=True)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def file_sizes(model: Model, runners: dict[str, Method], steps_done: int) -> dict[str, int]:
    """Bytes of the OSTAF export (kohya file + state sidecar) and of peft's LoRA as files."""
    import safetensors.torch
    from peft.utils import get_peft_model_state_dict

    ostaf, peft_runner = runners["ostaf"], runners["peft"]
    assert isinstance(ostaf, HookMethod) and isinstance(peft_runner, PeftMethod)
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="ostaf-bench-") as tmp:
        out = Path(tmp)
        result = TrainResult(
            config=CONFIG,
            network=ostaf.network,
            targets=model.targets,
            info=model.info,
            losses=[0.0] * steps_done,
            probe_loss_before=0.0,
            probe_loss_after=0.0,
            seconds=0.0,
            host_meta={"base_model": model.name, "resolution": 8 * LATENT},
        )
        kohya = export(result, out, "ostaf", save_state=True)
        sizes["ostaf_kohya"] = kohya.stat().st_size
        sizes["ostaf_state"] = (out / "ostaf.ostaf-state").stat().st_size
        # peft's weights in the same kohya layout, with only the standard ss_/modelspec metadata.
        metadata = build_metadata(
            name="peft",
            family=model.info.family,
            prediction_type=model.prediction_type,
            rank=CONFIG.rank,
            alpha=float(CONFIG.rank),
            resolution=8 * LATENT,
            method="attribute",
            ostaf={},
        )
        peft_kohya = save_adapter(out / "peft.safetensors", peft_runner.lora_modules(), metadata)
        sizes["peft_kohya"] = peft_kohya.stat().st_size
        native = out / "peft_native.safetensors"  # peft's own state dict (diffusers layout)
        safetensors.torch.save_file(get_peft_model_state_dict(peft_runner.unet), str(native))
        sizes["peft_native"] = native.stat().st_size
        for key, modules in (("ostaf", ostaf.lora_modules()), ("peft", peft_runner.lora_modules())):
            sizes[f"{key}_tensor_bytes"] = sum(
                (m.down.numel() + m.up.numel()) * 4 + 4 for m in modules.values()
            )
    return sizes


# --------------------------------------------------------------------------- report


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def _ms(seconds: float, digits: int = 1) -> str:
    return f"{seconds * 1e3:,.{digits}f} ms"


def _net(times: dict[str, float] | None) -> str:
    return f"{_ms(times['wall'])} / {_ms(times['cpu'])}" if times else "—"


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def _ok(value: float, goal: float) -> str:
    return f"{value:.3f} ({'met' if value <= goal else 'NOT met'})"


def _shared(load: list[float], threads: int) -> bool:
    """Whether other processes loaded the machine (the end value includes our own threads)."""
    half = 0.5 * (os.cpu_count() or 1)
    return load[0] > half or load[1] > threads + half


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    load = meta["loadavg_1min"]
    lines = [
        "# OSTAF training step vs peft LoRA",
        "",
        f"{meta['date']} · torch {meta['torch']} · diffusers {meta['diffusers']} · "
        f"peft {meta['peft']} · {meta['cpu']} ({meta['threads']} threads) · load average "
        f"{meta['loadavg_1min'][0]:.2f} → {meta['loadavg_1min'][1]:.2f} · "
        f"{meta['seconds']:.0f} s · `{meta['command']}`",
        "",
        "Same target layers (decoder attention q/k/v/out), rank 4, AdamW, batch 1, 16×16 "
        "latents (128 px), same latents/noise/timesteps for every method. Ratios are against "
        "peft in the same run.",
        "",
        *(
            [
                f"**Shared machine**: 1-min load average {load[0]:.1f} → {load[1]:.1f} on "
                f"{os.cpu_count()} CPUs, so other processes competed for them; absolute times "
                "are inflated and ratios noisier than on an idle machine.",
                "",
            ]
            if _shared(load, meta["threads"])
            else []
        ),
        "## Step time",
        "",
        "Median of the timed steps (methods interleaved, order rotated every round; min–max "
        "in brackets). `paired` = median over rounds of the step-time ratio within the round "
        "(neighbouring steps see similar machine load). CPU = process CPU time (all threads), "
        "less sensitive to other processes than wall time. `factor net` = the factor network "
        "alone (forward + backward, median of 20 interleaved runs; wall / CPU), part of every "
        "hook-method step. "
        "`per-layer heads (before)` = OSTAF with the hypernetwork forward it had before each "
        "head ran once per width (`PerLayerHeads` in `bench/step_benchmark.py`): the same "
        "parameters and factors, two head calls per layer.",
        "",
        "| model | method | trainable params | wall | CPU | wall ÷ peft | paired ÷ peft "
        "| CPU ÷ peft | factor net (wall / CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for r in results:
        times, net = r["times"], r["network_s"]
        wall = {m: statistics.median(times[m]["wall"]) for m in TIMED}
        cpu = {m: statistics.median(times[m]["cpu"]) for m in TIMED}
        paired_ratio: dict[str, float] = {}
        for m in TIMED:
            w = times[m]["wall"]
            paired = statistics.median(a / b for a, b in zip(w, times["peft"]["wall"], strict=True))
            paired_ratio[m] = paired
            lines.append(
                f"| {r['model']} ({r['warmup']}+{r['timed']} steps) | {LABELS[m]} "
                f"| {r['params'][m]:,} | {_ms(wall[m])} [{_ms(min(w), 0)}–{_ms(max(w), 0)}] "
                f"| {_ms(cpu[m])} | {wall[m] / wall['peft']:.3f} | {paired:.3f} "
                f"| {cpu[m] / cpu['peft']:.3f} | {_net(net.get(m))} |"
            )
        verdicts.append(
            f"- {r['model']}: OSTAF ÷ peft step time {_ok(wall['ostaf'] / wall['peft'], GOAL_TIME)}"
            f" against the goal ≤ {GOAL_TIME:.2f} (wall-time medians; paired "
            f"{paired_ratio['ostaf']:.3f}, CPU {cpu['ostaf'] / cpu['peft']:.3f}); with the "
            f"previous per-layer head calls {wall['ostaf_per_layer'] / wall['peft']:.3f} "
            f"(paired {paired_ratio['ostaf_per_layer']:.3f}, "
            f"CPU {cpu['ostaf_per_layer'] / cpu['peft']:.3f})."
        )
    lines += ["", *verdicts]
    lines += [
        "",
        "## Peak RSS",
        "",
        "One fresh process per method. `after load` = RSS with the model loaded; the kernel's "
        "peak counter is then reset, so `peak` = peak RSS from there through adapter setup and "
        "the training steps (base model included) and `Δ` = peak − after load.",
        "",
        "| model | method | after load | peak | Δ | peak ÷ peft | Δ ÷ peft |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for r in results:
        rss = r["rss"]
        peak = {m: rss[m]["peak_kib"] for m in METHODS}
        delta = {m: peak[m] - rss[m]["rss_loaded_kib"] for m in METHODS}
        for m in METHODS:
            dratio = f"{delta[m] / delta['peft']:.2f}" if delta["peft"] > 0 else "n/a"
            lines.append(
                f"| {r['model']} ({rss[m]['steps']} steps) | {LABELS[m]} "
                f"| {_mib(rss[m]['rss_loaded_kib'])} | {_mib(peak[m])} | {_mib(delta[m])} "
                f"| {peak[m] / peak['peft']:.3f} | {dratio} |"
            )
        verdicts.append(
            f"- {r['model']}: OSTAF ÷ peft peak RSS {_ok(peak['ostaf'] / peak['peft'], GOAL_RSS)}"
            f" against the goal ≤ {GOAL_RSS:.2f}"
        )
    lines += ["", *verdicts]
    lines += [
        "",
        "## Files",
        "",
        "kohya file = `.safetensors` that WebUIs load; OSTAF's is written by "
        "`lib_ostaf.method.train.export`, peft's by `save_adapter` on its A/B under the same keys. "
        "Tensor payload = LoRA down/up (fp32) + alpha; the rest is header and metadata "
        "(OSTAF's adds `ostaf.*` keys such as the target list). peft native = "
        "`get_peft_model_state_dict` as safetensors (diffusers layout, no alpha).",
        "",
        "| model | OSTAF kohya file | peft kohya file | tensor payload (each) "
        "| OSTAF `.ostaf-state` | peft native |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["sizes"]
        payload = _kib(s["ostaf_tensor_bytes"])
        if s["ostaf_tensor_bytes"] != s["peft_tensor_bytes"]:
            payload += f" vs {_kib(s['peft_tensor_bytes'])}"
        lines.append(
            f"| {r['model']} | {_kib(s['ostaf_kohya'])} | "
            f"{_kib(s['peft_kohya'])} | {payload} | {_kib(s['ostaf_state'])} | "
            f"{_kib(s['peft_native'])} |"
        )
    return "\n".join(lines) + "\n"


def run_model(name: str, warmup: int, timed: int, rss_steps: int, log: Callable) -> dict:
    t0 = time.perf_counter()
    model = load_model(name, warmup + timed)
    layers = len(model.targets)
    log(f"[{name}] loaded in {time.perf_counter() - t0:.1f}s; {layers} target layers")
    runners, times = time_steps(model, warmup, timed)
    log(f"[{name}] timed {warmup}+{timed} interleaved rounds")
    network_s = factor_network_times(runners)
    sizes = file_sizes(model, runners, warmup + timed)
    params = {m: runners[m].num_parameters() for m in TIMED}
    if params["direct"] != params["peft"]:
        raise RuntimeError(f"LoRA parameter counts differ: {params}")
    del runners, model
    gc.collect()
    rss = {}
    for m in METHODS:
        rss[m] = measure_rss(name, m, rss_steps)
        log(f"[{name}] RSS {m}: peak {_mib(rss[m]['peak_kib'])}")
    return {
        "model": name,
        "layers": layers,
        "warmup": warmup,
        "timed": timed,
        "times": times,
        "network_s": network_s,
        "rss": rss,
        "sizes": sizes,
        "params": params,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps")
    parser.add_argument(
        "--models", help="comma-separated: tiny,sd15 (default: both; --quick: tiny)"
    )
    parser.add_argument("--steps", type=int, help="timed interleaved rounds per model")
    parser.add_argument("--warmup", type=int, help="untimed rounds before the timed ones")
    parser.add_argument(
        "--out",
        type=Path,
        help="Markdown report (default bench/results/step_benchmark.md; --quick: none); "
        "raw numbers go next to it as .json",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rss-worker", help=argparse.SUPPRESS)  # model:method:steps:threads
    args = parser.parse_args(argv)

    if args.rss_worker:
        model_name, method, steps, threads = args.rss_worker.split(":")
        torch.set_num_threads(int(threads))
        print(json.dumps(rss_worker(model_name, method, int(steps))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    models = (args.models or ("tiny" if args.quick else ",".join(MODELS))).split(",")
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    out = args.out or (None if args.quick else ROOT / "bench/results/step_benchmark.md")
    table = QUICK_STEPS if args.quick else DEFAULT_STEPS

    started = time.perf_counter()
    load_start = os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"{time.perf_counter() - started:6.1f}s {msg}", file=sys.stderr, flush=True)

    results = []
    if load_start > 0.5:
        log(f"warning: load average {load_start:.2f}; other processes will add noise")
    for name in models:
        warmup, timed, rss_steps = table[name]
        warmup = warmup if args.warmup is None else args.warmup
        timed = timed if args.steps is None else args.steps
        results.append(run_model(name, warmup, timed, rss_steps, log))

    import diffusers
    import peft

    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "cpu": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "loadavg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],  # start, end
        "command": "python bench/step_benchmark.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.perf_counter() - started, 1),
    }
    text = report(results, meta)
    print(text)
    log(f"total {meta['seconds']}s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        raw = {"meta": meta, "results": results}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
        log(f"wrote {out} and {out.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
