"""The A1111 host adapter and applier against fakes of the WebUI (numbers, not smoke)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lib_ostaf.errors import IncompatibleModelError, InputError
from lib_ostaf.files.adapter_file import load_adapter
from lib_ostaf.files.naming import module_name_from_kohya
from lib_ostaf.hosts.a1111 import A1111Applier, A1111Host, train_on_loaded_model
from lib_ostaf.webui.activation import plan_generation, requests_for
from lib_ostaf.webui.jobs import JobManager
from lib_ostaf.webui.registry import AdapterRegistry
from lib_ostaf.webui.training_job import TrainRequest

from .conftest import pristine, same_weights
from .webui_fakes import FakeLora, FakeSdModel, FakeState, fake_modules, make_adapter

FAST = {"steps": 2, "lr": 1e-2, "n_views": 1, "resolution": 64, "sweep": (0.0, 1.0)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def sd_model():
    return FakeSdModel()


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())


def test_host_reads_the_model_through_a1111_paths(sd_model):
    host = A1111Host(sd_model, resolution=64)
    assert host.unet is sd_model.model.diffusion_model
    assert (host.family, host.prediction_type, host.resolution) == ("sd1", "epsilon", 64)
    assert torch.equal(host.alphas_cumprod, sd_model.alphas_cumprod)
    a, b = host.encode_image(_image()), host.encode_image(_image())
    assert a.shape == (1, 4, 8, 8) and torch.equal(a, b)  # the posterior's mode: deterministic
    cond = host.encode_prompt("a photo")
    assert cond.shape == (1, 7, 32) and not cond.requires_grad
    before = sd_model.calls["apply_model"]
    out = host.predict_noise(torch.zeros(2, 4, 8, 8), torch.tensor([10, 20]), cond)
    assert out.shape == (2, 4, 8, 8) and sd_model.calls["apply_model"] == before + 1
    assert host.decode_latents(a).size == (64, 64)


def test_host_refuses_inpainting_and_v_is_read(sd_model):
    sd_model.parameterization = "v"
    assert A1111Host(sd_model).prediction_type == "v_prediction"
    sd_model.model.conditioning_key = "hybrid"
    with pytest.raises(IncompatibleModelError, match="inpainting"):
        A1111Host(sd_model)


def test_training_leaves_the_model_exactly_as_found(sd_model, tmp_path):
    # A1111 leaves parameters trainable and we leave one submodule in train mode: both stay.
    sd_model.requires_grad_(True)
    sd_model.first_stage_model.train()
    saved = pristine(sd_model)
    modes = {n: m.training for n, m in sd_model.named_modules()}
    jobs = JobManager()
    job = jobs.begin()
    request = TrainRequest(image=_image(), name="t1", preview_every=1, preview_steps=2, **FAST)
    with fake_modules(sd_model) as shared:
        result = jobs.run(
            job, lambda j: train_on_loaded_model(jobs, j, request, tmp_path, A1111Applier())
        ).result
        assert job.status == "done", job.error
        assert len(shared.state.images) == 2  # previews
        # the bar ends after the λ sweep: 2 steps + 2 images × 2 sampling steps
        assert shared.state.sampling_step == shared.state.sampling_steps == 2 + 2 * 2
        assert "λ sweep" in shared.state.textinfo and job.phase == "rendering the λ sweep"
    assert same_weights(sd_model, saved)
    assert all(p.requires_grad for p in sd_model.parameters())
    assert {n: m.training for n, m in sd_model.named_modules()} == modes
    assert all(not m._forward_hooks for m in sd_model.modules())
    assert result["layers"] == 24 and result["steps"] == 2  # 3 high-res decoder blocks × 2 × 4
    adapter = load_adapter(tmp_path / "t1.safetensors")
    assert len(adapter.modules) == 24 and adapter.family == "sd1"
    assert any(m.up.abs().sum() > 0 for m in adapter.modules.values())
    assert (tmp_path / "t1.preview.png").is_file() and job.images["sweep"].size[0] == 128


def test_training_refuses_lowvram_no_model_and_bad_names(sd_model, tmp_path):
    jobs = JobManager()
    request = TrainRequest(image=_image(), name="ok", **FAST)
    with fake_modules(sd_model, lowvram=True), pytest.raises(InputError, match="--lowvram"):
        train_on_loaded_model(jobs, jobs.begin(), request, tmp_path, A1111Applier())
    with fake_modules(None), pytest.raises(InputError, match="no model is loaded"):
        train_on_loaded_model(JobManager(), JobManager().begin(), request, tmp_path, None)
    for bad in ("../up", "a/b", "a\\b", "nul\x00", ""):
        with pytest.raises(InputError):
            TrainRequest(image=_image(), name=bad, **FAST).validate(tmp_path)
    with pytest.raises(InputError, match="no reference image"):
        TrainRequest(image=None, name="x", **FAST).validate(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written by refusals


def test_interrupt_mid_training_writes_nothing(sd_model, tmp_path):
    saved = pristine(sd_model)
    jobs = JobManager()
    job = jobs.begin()
    request = TrainRequest(image=_image(), name="stopped", **(FAST | {"steps": 50}))
    with fake_modules(sd_model) as shared:

        def stop_after_first(*_: object) -> None:
            shared.state.interrupted = True  # the WebUI's Interrupt button

        shared.state.assign_current_image = stop_after_first
        request.preview_every, request.preview_steps = 1, 1
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, tmp_path, A1111Applier()))
    assert job.status == "interrupted" and "step 1/50" in job.error
    assert not list(tmp_path.iterdir())
    assert same_weights(sd_model, saved)


class _SweepWatch(FakeState):
    """Records the progress bar; presses Interrupt once the sweep's first image is done."""

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        if key == "textinfo" and value:
            self.seen = [
                *getattr(self, "seen", []),
                (self.sampling_step, self.sampling_steps, value),
            ]
            if "image 1/" in value:
                self.interrupted = True


def test_progress_covers_the_sweep_and_interrupt_stops_it(sd_model, tmp_path):
    jobs = JobManager()
    job = jobs.begin()
    request = TrainRequest(image=_image(), name="swept", **(FAST | {"sweep": (0.0, 0.5, 1.0)}))
    request.preview_steps = 3
    with fake_modules(sd_model) as shared:
        shared.state = state = _SweepWatch()
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, tmp_path, A1111Applier()))
    assert job.status == "interrupted" and "λ sweep (1/3 images)" in job.error
    assert not list(tmp_path.iterdir())  # nothing written
    total = 2 + 3 * 3  # training steps + 3 sweep images × 3 sampling steps
    training = [(s, n) for s, n, t in state.seen if t.startswith("OSTAF training")]
    sweep = [(s, n, t) for s, n, t in state.seen if "λ sweep" in t]
    assert training == [(1, total), (2, total)]
    assert [(s, n) for s, n, _ in sweep] == [(2, total), (5, total)]
    assert sweep[-1][2] == "OSTAF: rendering the λ sweep, image 1/3"
    assert job.phase == "rendering the λ sweep" and job.progress == pytest.approx(5 / total)


# --------------------------------------------------------------------------- generation


@pytest.fixture()
def folder(tmp_path, sd_model):
    unet = sd_model.model.diffusion_model
    make_adapter(tmp_path, "app", unet, seed=1, preferred=0.9)
    make_adapter(tmp_path, "shp", unet, attribute="shape", seed=2)
    make_adapter(tmp_path, "xl", unet, family="sdxl", seed=3)
    make_adapter(tmp_path, "other_lora", unet, seed=4)  # stands for a user's <lora:…>
    return tmp_path


def _plan(folder, tags, ui=(), **xyz):
    requests, messages = requests_for([t.split(":") for t in tags], ui, **xyz)
    return plan_generation(requests, AdapterRegistry(folder), "sd1", messages)


def _expected(sd_model, base, folder, terms):
    """Base weights plus Σ λ·ΔW, computed independently from the files."""
    unet = sd_model.model.diffusion_model
    from lib_ostaf.files.naming import inspect_unet

    info = inspect_unet(unet)
    want = {k: v.clone() for k, v in base.items()}
    for name, lam in terms:
        for key, m in load_adapter(folder / f"{name}.safetensors").modules.items():
            w = "model.diffusion_model." + module_name_from_kohya(key, info) + ".weight"
            want[w] = want[w] + lam * m.delta()
    return want


def _close(sd_model, want):
    state = sd_model.state_dict()
    return all(torch.allclose(state[k], v, atol=1e-6) for k, v in want.items())


def test_plan_messages_and_defaults(folder):
    plan = _plan(folder, ["app", "nope:1", "shp:abc", "xl:1", "shp:0.5"])
    assert [(a.name, a.weight) for a in plan.adapters] == [("app", 0.9), ("shp", 0.5)]
    text = " | ".join(plan.messages)
    assert "'nope' not found" in text and "λ must be a number" in text and "SDXL" in text
    assert plan.infotext().startswith("app:0.9 (") and ", shp:0.5 (" in plan.infotext()
    # X/Y/Z: λ override applies to every OSTAF adapter; adapter axis adds one
    xyz = _plan(folder, ["app"], xyz_lambda=0.25, xyz_adapter="shp")
    assert [(a.name, a.weight) for a in xyz.adapters] == [("app", 0.25), ("shp", 0.25)]


def test_riding_the_builtin_lora_restores_exactly(sd_model, folder):
    lora = FakeLora(sd_model)
    applier = A1111Applier(networks=lora)
    base = pristine(sd_model)
    user_lora = (("other_lora", str(folder / "other_lora.safetensors"), 0.6),)

    def generate(lora_files, tags, ui=()):
        lora.activate_lora(list(lora_files))  # Lora's activate (clears the set)
        messages = applier.apply(sd_model, _plan(folder, tags, ui).adapters)
        lora.forward_all()  # lazy merge on each layer's forward
        return messages

    assert generate(user_lora, ["app:0.8"]) == [] and applier.mode == "lora"
    assert _close(sd_model, _expected(sd_model, base, folder, [("other_lora", 0.6), ("app", 0.8)]))
    generate((), ["app:0.8", "shp"], [("app", 1.5)])  # composition; UI overrides λ of app
    assert _close(sd_model, _expected(sd_model, base, folder, [("app", 1.5), ("shp", 0.7)]))
    loads = lora.loads
    generate((), ["app:0.3"])  # another λ: no reload from disk, re-merge from backup
    assert lora.loads == loads
    generate((), [])  # no tags → exact restore
    assert same_weights(sd_model, base)
    assert lora.available_network_hash_lookup == {"userlora1234": "user's"}  # untouched
    for _ in range(3):  # a sequence mixing everything, then nothing: bit-identical
        generate(user_lora, ["app:-1", "shp:2"])
        generate((), ["nope", "xl"])
    generate((), [])
    assert same_weights(sd_model, base)


def test_clear_for_training_unmerges_lora_state(sd_model, folder):
    lora = FakeLora(sd_model)
    applier = A1111Applier(networks=lora)
    base = pristine(sd_model)
    lora.activate_lora([("other_lora", str(folder / "other_lora.safetensors"), 1.0)])
    applier.apply(sd_model, _plan(folder, ["app"]).adapters)
    lora.forward_all()
    assert not same_weights(sd_model, base)
    applier.clear_for_training(sd_model)
    assert same_weights(sd_model, base) and lora.loaded_networks == []


def test_fallback_without_builtin_lora(sd_model, folder):
    applier = A1111Applier(networks=None)
    base = pristine(sd_model)
    assert applier.apply(sd_model, _plan(folder, ["app:0.8", "shp:-0.5"]).adapters) == []
    assert applier.mode == "fallback"
    assert _close(sd_model, _expected(sd_model, base, folder, [("app", 0.8), ("shp", -0.5)]))
    applier.apply(sd_model, _plan(folder, ["app:0.2"]).adapters)
    assert _close(sd_model, _expected(sd_model, base, folder, [("app", 0.2)]))
    applier.apply(sd_model, [])
    assert same_weights(sd_model, base)
    applier.apply(sd_model, _plan(folder, ["app"]).adapters)
    applier.reset(sd_model)  # script unloaded / reload UI
    assert same_weights(sd_model, base)


def _expected_parts(sd_model, base, folder, name, weights):
    """Base weights plus Σ_part λ_part·ΔW_part, the parts read from the file's JSON table."""
    import json

    from lib_ostaf.files.naming import inspect_unet

    info = inspect_unet(sd_model.model.diffusion_model)
    adapter = load_adapter(folder / f"{name}.safetensors")
    table = json.loads(adapter.metadata["ostaf.parts"])
    want = {k: v.clone() for k, v in base.items()}
    for part, keys in table.items():
        for key in keys:
            w = "model.diffusion_model." + module_name_from_kohya(key, info) + ".weight"
            want[w] = want[w] + weights[part] * adapter.modules[key].delta()
    return want


@pytest.mark.parametrize("builtin", [True, False])
def test_each_part_merges_with_its_own_lambda_and_restores(sd_model, folder, builtin):
    make_adapter(folder, "duo", sd_model.model.diffusion_model, attribute="shape+appearance")
    lora = FakeLora(sd_model) if builtin else None
    applier = A1111Applier(networks=lora)
    base = pristine(sd_model)

    def generate(tags):
        if lora is not None:
            lora.activate_lora([])
        messages = applier.apply(sd_model, _plan(folder, tags).adapters)
        if lora is not None:
            lora.forward_all()
        return messages

    assert generate(["duo:1:shape=0.25:appearance=1.5"]) == []
    assert applier.mode == ("lora" if builtin else "fallback")
    want = _expected_parts(sd_model, base, folder, "duo", {"shape": 0.25, "appearance": 1.5})
    assert _close(sd_model, want)
    generate(["duo:0.5:appearance=0"])  # a part at 0 is not merged; the other takes λ
    assert _close(
        sd_model, _expected_parts(sd_model, base, folder, "duo", {"shape": 0.5, "appearance": 0})
    )
    generate(["duo:0.5"])  # no dials: the whole file at one λ
    assert _close(
        sd_model, _expected_parts(sd_model, base, folder, "duo", {"shape": 0.5, "appearance": 0.5})
    )
    generate([])
    assert same_weights(sd_model, base)
