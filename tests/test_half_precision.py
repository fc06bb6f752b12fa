"""Training on half-precision UNet weights (A1111 and Forge keep fp16 on a GPU; the CLI loads
half on a GPU): fp16 scales the loss, the factors' gradients agree with the fp32 run's, the
loss falls, no step has all-zero gradients, and a run that learns nothing stops.

All on the CPU, with fp16 / bf16 copies of the tiny SD1 stand-in (PyTorch runs fp16 on the
CPU, slowly). Measured on this machine (seeded, so stable): at 32² latents with small factors
(0.001 · N(0, 1)), fp16 without loss scaling flushes 38 % of the factor gradients to zero
(relative error 17 %); with the scaler the relative error is 0.15 %, bf16's is 1.3 %.
"""

from __future__ import annotations

import pytest
import torch

import lib_ostaf.method.memory as memory
from lib_ostaf.errors import TrainingDiverged
from lib_ostaf.hosts.diffusers_host import DiffusersHost
from lib_ostaf.method.memory import (
    ZERO_GRAD_STEPS,
    LossScaler,
    Precision,
    needs_loss_scaling,
    training_options,
)
from lib_ostaf.method.offsets import OffsetHooks
from lib_ostaf.method.targets import TargetSpec, find_module, select_targets
from lib_ostaf.method.train import (
    AttributeConfig,
    Callbacks,
    diffusion_loss,
    run_steps,
    train_attribute,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Tolerances on ‖g − g₃₂‖ / ‖g₃₂‖ over all factors' gradients (measured: 0.15 %, 1.3 %).
FP16_TOLERANCE = 0.01
BF16_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def hosts():
    """The tiny SD1 at 256 px (32² latents) in fp32, fp16 and bf16 (same weights)."""
    return {
        name: DiffusersHost.load("tiny-sd1", device="cpu", dtype=name, resolution=256)
        for name in ("fp32", "fp16", "bf16")
    }


def _factor_grads(host, precision: Precision, magnitude: float = 1e-3) -> torch.Tensor:
    """All factors' gradients of one diffusion loss, through ``precision``'s backward."""
    targets = select_targets(host.unet, TargetSpec(attribute="appearance"))
    modules = {t.kohya: find_module(host.unet, t.name) for t in targets}
    g = torch.Generator().manual_seed(0)
    factors = {
        t.kohya: (
            (torch.randn(2, t.in_features, generator=g) * magnitude).requires_grad_(),
            (torch.randn(t.out_features, 2, generator=g) * magnitude).requires_grad_(),
        )
        for t in targets
    }
    params = [p for pair in factors.values() for p in pair]
    optimizer = torch.optim.AdamW(params)
    side = host.resolution // 8
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 1, 4, side, side, generator=g)
    cond = host.encode_prompt("a photo of a ostafv textured object")
    host.unet.requires_grad_(False)
    with OffsetHooks(modules) as hooks:
        hooks.factors = factors
        with precision.autocast():
            loss = diffusion_loss(host, x0, noise, torch.tensor([300]), cond)
        precision.backward(loss, optimizer)
    assert all(p.grad.dtype == torch.float32 for p in params)  # fp32 factors, fp32 gradients
    return torch.cat([p.grad.flatten() for p in params])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_auto_precision_scales_the_loss_for_fp16_weights(hosts):
    cpu = torch.device("cpu")
    for name, scaled in (("fp32", False), ("fp16", True), ("bf16", False)):
        unet = hosts[name].unet
        assert needs_loss_scaling(None, unet) is scaled
        for precision in ("auto", "fp32", "bf16"):  # fp16 weights compute in fp16 whatever
            with training_options(unet, cpu, "sd1", precision, "off") as p:
                assert (p.scaler is not None) is scaled, (name, precision)
    assert needs_loss_scaling(torch.float16, hosts["fp32"].unet)  # fp16 autocast
    assert Precision(torch.float16, torch.device("cuda")).scaler is not None


def test_half_gradients_agree_with_fp32(hosts):
    cpu = torch.device("cpu")
    reference = _factor_grads(hosts["fp32"], Precision(None, cpu))
    unet16 = hosts["fp16"].unet
    with training_options(unet16, cpu, "sd1", "auto", "off") as scaled:
        fp16 = _factor_grads(hosts["fp16"], scaled)
    unscaled = _factor_grads(hosts["fp16"], Precision(None, cpu))
    with training_options(hosts["bf16"].unet, cpu, "sd1", "auto", "off") as plain:
        bf16 = _factor_grads(hosts["bf16"], plain)

    assert _rel(fp16, reference) < FP16_TOLERANCE
    assert _rel(bf16, reference) < BF16_TOLERANCE
    assert not (fp16 == 0).any() and not (bf16 == 0).any() and not (reference == 0).any()
    # What the scaler fixes: without it fp16 flushes many small gradients to zero.
    assert float((unscaled == 0).float().mean()) > 0.1
    assert _rel(unscaled, reference) > 5 * _rel(fp16, reference)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_training_on_half_weights_learns(dtype, reference_image, monkeypatch):
    host = DiffusersHost.load("tiny-sd1", device="cpu", dtype=dtype)
    zero_flags: list[bool] = []
    plain_all_zero = memory.all_zero

    def spy(grads):
        zero_flags.append(plain_all_zero(grads))
        return zero_flags[-1]

    monkeypatch.setattr(memory, "all_zero", spy)
    config = AttributeConfig(steps=8, lr=1e-2, n_views=1)
    result = train_attribute(host, reference_image, config)
    assert len(zero_flags) == config.steps and not any(zero_flags)  # no all-zero step
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.probe_loss_after < result.probe_loss_before  # the loss falls
    assert all(p.dtype == torch.float32 for p in result.network.parameters())
    assert {p.dtype for p in host.unet.parameters()} == {host.dtype}  # weights left as found


def test_optimizer_state_stays_fp32_and_the_scale_never_reaches_it():
    """AdamW's moments equal those of an unscaled fp32 run (power-of-two scale, exact)."""
    runs = []
    for scaling in (False, True):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 6))
        opt = torch.optim.AdamW([w], lr=0.1)
        precision = Precision(None, torch.device("cpu"), scaling=scaling)
        run_steps(
            4, lambda step, w=w: ((w - 0.5) ** 2).sum(), opt, Callbacks(), precision=precision
        )
        state = opt.state[w]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        runs.append((w.detach().clone(), state["exp_avg"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_overflowing_steps_lower_the_scale_without_diverging():
    """fp16 gradients 100 × the scale overflow until the scale falls to ≤ 512: those steps
    are skipped but not counted as divergence (3 would be); then training proceeds."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([w], lr=0.1)
    precision = Precision(None, torch.device("cpu"), scaling=True)
    moved = []

    def step_loss(step):
        return (w.half() * 100).float().sum()

    callbacks = Callbacks(progress=lambda *a: moved.append(w.detach().clone()))
    run_steps(12, step_loss, opt, callbacks, precision=precision)
    assert precision.scaler.scale == 2.0**9  # 2¹⁶ halved 7 times
    assert torch.equal(moved[6], torch.ones(4))  # the 7 overflowing steps did not step
    assert (w < 1).all()  # the last 5 did
    with pytest.raises(TrainingDiverged, match="non-finite"):  # a non-finite loss still counts
        run_steps(10, lambda s: (w * float("inf")).sum(), opt, Callbacks(), precision=precision)


def test_zero_gradients_stop_training():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    seen = []
    progress = Callbacks(progress=lambda step, total, loss: seen.append(step))
    with pytest.raises(TrainingDiverged, match=f"zero for {ZERO_GRAD_STEPS} steps in a row"):
        run_steps(100, lambda s: (w * 0).sum(), opt, progress)
    assert seen == list(range(1, ZERO_GRAD_STEPS))  # stopped at step K, before reporting it
    with pytest.raises(TrainingDiverged, match="zero for 3 steps"):  # a short run: all steps
        run_steps(3, lambda s: (w * 0).sum(), opt, Callbacks())
    # Zero steps that are not K in a row do not stop a run (a nonzero step resets the count)
    every_other = run_steps(3 * ZERO_GRAD_STEPS, lambda s: (w * (s % 2)).sum(), opt, Callbacks())
    assert len(every_other) == 3 * ZERO_GRAD_STEPS


def test_zero_gradients_raise_the_loss_scale():
    scaler = LossScaler()
    scaler.stepped(zero=True)
    assert scaler.scale == 2 * LossScaler.INIT
    for _ in range(LossScaler.GROWTH_INTERVAL):
        scaler.stepped(zero=False)
    assert scaler.scale == 4 * LossScaler.INIT
    scaler.scale = 1.0
    assert scaler.overflow() is False  # at scale 1 an overflow is divergence, not the scale
