"""The step schedule (start=/end=): which steps, boundaries only, touched layers only,
exact restore — pure rules, the A1111 Lora path, its fallback and Forge (fakes)."""

from __future__ import annotations

import pytest
import torch

from lib_ostaf.files.adapter_file import load_adapter
from lib_ostaf.files.naming import inspect_unet, module_name_from_kohya
from lib_ostaf.hosts.a1111 import A1111Applier
from lib_ostaf.hosts.forge import ForgeApplier
from lib_ostaf.method.schedule import StepSchedule, boundaries, inside, webui_step
from lib_ostaf.webui.activation import plan_generation, requests_for
from lib_ostaf.webui.registry import AdapterRegistry

from .conftest import pristine, same_weights
from .forge_fakes import FakeForgeModel
from .webui_fakes import FakeLora, FakeSdModel, make_adapter


def test_steps_inside_a_window_and_boundaries():
    assert [s for s in range(20) if inside(0.2, 0.8, s, 20)] == list(range(4, 16))
    assert boundaries([(0.2, 0.8)], 20) == [4, 16]
    assert boundaries([(0.0, 1.0)], 20) == []
    assert boundaries([(0.0, 0.5), (0.5, 1.0)], 10) == [5]
    assert [s for s in range(3) if inside(0.5, 1.0, s, 3)] == [2]  # 1/3 < 0.5 ≤ 2/3
    schedule = StepSchedule(["a", "b"], [(0.0, 0.5), (0.25, 1.0)])
    assert schedule.scheduled and schedule.first() == ["a"]
    assert schedule.at(0, 4) is None  # same set as first(): nothing to do
    assert schedule.at(1, 4) == ["a", "b"]
    assert schedule.at(1, 4) is None
    assert schedule.at(2, 4) == ["b"]
    assert schedule.at(0, 4) == ["a"]  # a new pass (hires) starts over with the same rule
    # a WebUI's sampling_step is the last finished step: the call of step i≥1 sees i-1
    assert [webui_step(s, c) for s, c in [(0, 0), (0, 1), (1, 2), (5, 6)]] == [0, 1, 2, 6]


@pytest.fixture()
def world(tmp_path):
    sd_model = FakeSdModel()
    unet = sd_model.model.diffusion_model
    make_adapter(tmp_path, "app", unet, seed=1)
    make_adapter(tmp_path, "shp", unet, attribute="shape", seed=2)
    make_adapter(tmp_path, "user", unet, seed=4)  # stands for a user's <lora:…>
    return sd_model, tmp_path


def _plan(folder, *tags):
    requests, messages = requests_for([t.split(":") for t in tags])
    plan = plan_generation(requests, AdapterRegistry(folder), "sd1", messages)
    assert not plan.messages
    return plan


def _expected(unet, prefix, base, folder, terms):
    info = inspect_unet(unet)
    want = {k: v.clone() for k, v in base.items()}
    for name, lam in terms:
        for key, m in load_adapter(folder / f"{name}.safetensors").modules.items():
            w = prefix + module_name_from_kohya(key, info) + ".weight"
            want[w] = want[w] + lam * m.delta()
    return want


def _layers(folder, unet, name):
    info = inspect_unet(unet)
    keys = load_adapter(folder / f"{name}.safetensors").modules
    return {"diffusion_model_" + module_name_from_kohya(k, info).replace(".", "_") for k in keys}


def test_a1111_lora_switches_only_at_boundaries_and_only_its_layers(world):
    sd_model, folder = world
    unet = sd_model.model.diffusion_model
    lora = FakeLora(sd_model)
    applier = A1111Applier(networks=lora)
    base = pristine(sd_model)
    lora.activate_lora([("user", str(folder / "user.safetensors"), 0.5)])
    applier.apply(sd_model, _plan(folder, "shp:1", "app:0.8:start=0.25:end=0.75").adapters)
    total, per_step = 8, []
    for step in range(total):
        applier.on_step(sd_model, step, total)
        lora.remerged.clear()
        lora.forward_all()  # the step's model call: Lora's lazy merge per layer
        per_step.append(set(lora.remerged))
        on = 2 <= step < 6
        terms = [("user", 0.5), ("shp", 1.0)] + ([("app", 0.8)] if on else [])
        want = _expected(unet, "model.diffusion_model.", base, folder, terms)
        state = sd_model.state_dict()
        assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in want.items()), step
    app = _layers(folder, unet, "app")
    assert per_step[0]  # the first call merges everything Lora has loaded
    assert [s for s in per_step[1:]] == [set(), app, set(), set(), set(), app, set()]
    lora.activate_lora([])  # the next generation, no tags: exact restore
    applier.apply(sd_model, [])
    lora.forward_all()
    assert same_weights(sd_model, base)


def test_a1111_fallback_remerges_only_the_switched_adapter(world):
    sd_model, folder = world
    unet = sd_model.model.diffusion_model
    applier = A1111Applier(networks=None)
    base = pristine(sd_model)
    applier.apply(sd_model, _plan(folder, "shp:1", "app:0.5:end=0.5").adapters)
    touched = []
    for step in range(4):
        applier.on_step(sd_model, step, 4)
        touched.append(len(applier._patcher.last_touched) if step in (0, 2) else None)
    assert touched[2] == len(_layers(folder, unet, "app"))  # app off at step 2, shp untouched
    want = _expected(unet, "model.diffusion_model.", base, folder, [("shp", 1.0)])
    state = sd_model.state_dict()
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in want.items())
    applier.apply(sd_model, [])
    assert same_weights(sd_model, base)


def _forge_weights(sd_model):
    unet = sd_model.forge_objects_original.unet.model.diffusion_model
    return {k: v.detach().clone() for k, v in unet.named_parameters()}


class _P:
    def __init__(self, sd_model):
        self.sd_model = sd_model


@pytest.mark.parametrize("interrupt_at", [None, 3])
def test_forge_schedule_merges_at_boundaries_and_restores_exactly(tmp_path, interrupt_at):
    sd_model = FakeForgeModel()
    unet = sd_model.forge_objects_original.unet.model.diffusion_model
    make_adapter(tmp_path, "app", unet, seed=1)
    make_adapter(tmp_path, "shp", unet, attribute="shape", seed=2)
    base = _forge_weights(sd_model)
    applier = ForgeApplier()
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    applier.apply(sd_model, _plan(tmp_path, "shp:1", "app:0.8:start=0.5").adapters)
    applier.patch_unet(_P(sd_model))
    sd_model.forge_objects.unet.refresh_loras()  # Forge loads the model: shp merged
    for step in range(6):
        if step == interrupt_at:
            break  # an interrupt ends sampling; the script's postprocess still runs
        applier.on_step(sd_model, step, 6)
        terms = [("shp", 1.0)] + ([("app", 0.8)] if step >= 3 else [])
        want = _expected(unet, "", base, tmp_path, terms)
        got = _forge_weights(sd_model)
        assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in want.items()), step
    applier.finish()  # postprocess: the schedule's weights go back
    want = _expected(unet, "", base, tmp_path, [("shp", 1.0)])
    got = _forge_weights(sd_model)
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in want.items())
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    applier.apply(sd_model, [])  # the next batch, no tags
    applier.patch_unet(_P(sd_model))
    sd_model.forge_objects.unet.refresh_loras()
    assert all(torch.equal(_forge_weights(sd_model)[k], v) for k, v in base.items())


def test_forge_crash_without_postprocess_is_restored_by_the_next_plan(tmp_path):
    sd_model = FakeForgeModel()
    unet = sd_model.forge_objects_original.unet.model.diffusion_model
    make_adapter(tmp_path, "app", unet, seed=1)
    base = _forge_weights(sd_model)
    applier = ForgeApplier()
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    applier.apply(sd_model, _plan(tmp_path, "app:1:end=0.5").adapters)
    applier.on_step(sd_model, 0, 4)
    assert not all(torch.equal(_forge_weights(sd_model)[k], v) for k, v in base.items())
    applier.apply(sd_model, [])  # no finish() in between (an exception skipped it)
    assert all(torch.equal(_forge_weights(sd_model)[k], v) for k, v in base.items())
