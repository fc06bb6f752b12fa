"""The Forge host adapter and applier against fakes of Forge 2 (numbers, not smoke)."""

from __future__ import annotations

import sys
import types

import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from lib_ostaf.errors import IncompatibleModelError
from lib_ostaf.files.naming import inspect_unet, is_linear_like, module_name_from_kohya
from lib_ostaf.hosts import forge
from lib_ostaf.hosts.forge import ForgeApplier, ForgeHost, patch_id, train_on_loaded_model
from lib_ostaf.webui.activation import plan_generation, requests_for
from lib_ostaf.webui.jobs import JobManager
from lib_ostaf.webui.registry import AdapterRegistry
from lib_ostaf.webui.training_job import TrainRequest

from .forge_fakes import (
    FakeForgeModel,
    FakeLdmForgeModel,
    FakeLoRAAdapter,
    FakeModelPatcher,
    FakeNeoModelPatcher,
    ForgeLinear,
    fake_forge_modules,
    fake_ldm_forge_modules,
    fake_neo_modules,
    forgeify,
)
from .unets import tiny_ldm_unet
from .webui_fakes import make_adapter

FAST = {"steps": 2, "lr": 1e-2, "n_views": 1, "resolution": 64, "sweep": (0.0, 1.0)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def sd_model():
    return FakeForgeModel()


def _unet(sd_model):
    return sd_model.forge_objects_original.unet.model.diffusion_model


def _weights(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())


def _plan(folder, *pairs):
    registry = AdapterRegistry(lambda: folder)
    requests, messages = requests_for([list(p) for p in pairs])
    return plan_generation(requests, registry, "sd1", messages)


class _P:  # the processing object the script hooks see
    def __init__(self, sd_model):
        self.sd_model = sd_model


def _generate(applier, sd_model, plan):
    """One batch as Forge runs it: reset → activate → process_before_every_sampling → load."""
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    messages = applier.apply(sd_model, plan.adapters)
    messages += applier.patch_unet(_P(sd_model))
    sd_model.forge_objects.unet.refresh_loras()  # memory_management loads it for sampling
    return messages


@pytest.fixture()
def folder(tmp_path, sd_model):
    unet = _unet(sd_model)
    make_adapter(tmp_path, "app", unet, seed=1)
    make_adapter(tmp_path, "shp", unet, attribute="shape", seed=2)
    return tmp_path


# --------------------------------------------------------------------------- detection


def test_detection_by_importable_packages(monkeypatch):
    assert forge.forge_generation() == 0 and not forge.is_forge()
    monkeypatch.setitem(sys.modules, "modules_forge", types.ModuleType("modules_forge"))
    assert forge.forge_generation() == 1  # old Forge: no backend.patcher
    monkeypatch.setitem(sys.modules, "backend.patcher.base", types.ModuleType("b"))
    assert forge.forge_generation() == 2


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_forge_linear_layers_are_found(family):
    plain = inspect_unet(tiny_ldm_unet(family))
    unet = forgeify(tiny_ldm_unet(family))
    lin = next(m for m in unet.modules() if isinstance(m, ForgeLinear))
    assert not isinstance(lin, torch.nn.Linear) and is_linear_like(lin)
    assert inspect_unet(unet) == plain  # family, layout, context width all unchanged


# --------------------------------------------------------------------------- generation


def test_patches_equal_lambda_delta_and_clone_leaves_original(sd_model, folder):
    unet = _unet(sd_model)
    before = _weights(unet)
    original = sd_model.forge_objects_after_applying_lora.unet
    applier = ForgeApplier()
    plan = _plan(folder, ("app", "0.7"), ("shp", "-1.3"))
    assert _generate(applier, sd_model, plan) == []
    patched = sd_model.forge_objects.unet
    assert patched is not original and original.lora_patches == {}  # clone only
    info = inspect_unet(unet)
    after = _weights(unet)
    expected = {k: torch.zeros_like(v) for k, v in before.items()}
    for planned in plan.adapters:
        for key, module in planned.adapter.modules.items():
            name = module_name_from_kohya(key, info) + ".weight"
            expected[name] += planned.weight * module.delta()
    worst = max((after[k] - before[k] - expected[k]).abs().max().item() for k in before)
    assert worst < 1e-6
    n_layers = sum(len(a.adapter.modules) for a in plan.adapters)
    assert sum(1 for k in before if expected[k].any()) == n_layers == 72  # appearance + shape
    # next generation without tags: the reset base is loaded → weights exactly restored
    _generate(applier, sd_model, _plan(folder))
    assert all(torch.equal(_weights(unet)[k], before[k]) for k in before)


def test_retrained_file_gets_a_new_identity_and_is_remerged(sd_model, folder):
    unet = _unet(sd_model)
    before = _weights(unet)
    applier = ForgeApplier()
    first = _plan(folder, ("app", "1"))
    _generate(applier, sd_model, first)
    merges = sd_model.forge_objects_original.unet.lora_loader.merges
    make_adapter(folder, "app", unet, seed=99)  # "retrained": same name, new content
    second = _plan(folder, ("app", "1"))
    assert second.adapters[0].identity != first.adapters[0].identity
    assert patch_id(second.adapters[0]) != patch_id(first.adapters[0])
    _generate(applier, sd_model, second)
    assert sd_model.forge_objects_original.unet.lora_loader.merges == merges + 1
    info = inspect_unet(unet)
    worst = 0.0
    for key, module in second.adapters[0].adapter.modules.items():
        name = module_name_from_kohya(key, info) + ".weight"
        diff = _weights(unet)[name] - before[name] - module.delta()
        worst = max(worst, diff.abs().max().item())
    assert worst < 1e-6


def test_composes_with_forge_lora_and_hires_pass_is_idempotent(sd_model, folder):
    unet = _unet(sd_model)
    before = _weights(unet)
    info = inspect_unet(unet)
    make_adapter(folder, "user_lora", unet, seed=5)
    user = _plan(folder, ("user_lora", "1")).adapters[0].adapter
    # Forge's builtin LoRA: writes forge_objects_after_applying_lora (its own patches)
    lora_unet = sd_model.forge_objects_original.unet.clone()
    lora_patches = {
        f"diffusion_model.{module_name_from_kohya(k, info)}.weight": (
            "lora",
            (m.up, m.down, m.alpha, None, None),
        )
        for k, m in user.modules.items()
    }
    lora_unet.add_patches(
        filename="user_lora.safetensors", patches=lora_patches, strength_patch=0.5
    )
    sd_model.forge_objects_after_applying_lora.unet = lora_unet
    applier = ForgeApplier()
    plan = _plan(folder, ("app", "2"))
    _generate(applier, sd_model, plan)
    n_ids = len(sd_model.forge_objects.unet.lora_patches)
    applier.patch_unet(_P(sd_model))  # hires: called again without a reset in between
    assert len(sd_model.forge_objects.unet.lora_patches) == n_ids == 2
    sd_model.forge_objects.unet.refresh_loras()
    after = _weights(unet)
    worst = 0.0
    for k in before:
        want = torch.zeros_like(before[k])
        for adapter, lam in ((user, 0.5), (plan.adapters[0].adapter, 2.0)):
            for key, m in adapter.modules.items():
                if module_name_from_kohya(key, info) + ".weight" == k:
                    want += lam * m.delta()
        worst = max(worst, (after[k] - before[k] - want).abs().max().item())
    assert worst < 1e-6


def test_zero_lambda_and_wrong_family_are_skipped(sd_model, folder):
    make_adapter(folder, "xl", _unet(sd_model), family="sdxl", seed=3)
    applier = ForgeApplier()
    plan = _plan(folder, ("app", "0"), ("xl", "1"))
    assert any("SDXL" in m for m in plan.messages)
    _generate(applier, sd_model, plan)
    assert sd_model.forge_objects.unet.lora_patches == {}


# --------------------------------------------------------------------------- object tokens


def _bundle(path, token, vec):
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = safetensors.torch.load_file(str(path))
    state[f"bundle_emb.{token}.emb_params"] = vec
    metadata["ostaf.method"] = "object"
    safetensors.torch.save_file(state, str(path), metadata)


def test_object_tokens_registered_on_the_text_engine(sd_model, folder):
    vec = torch.randn(2, 768)
    _bundle(folder / "app.safetensors", "<mug1>", vec)
    applier = ForgeApplier()
    with fake_forge_modules(sd_model) as fakes:
        cache = fakes.processing.StableDiffusionProcessing.cached_c
        _generate(applier, sd_model, _plan(folder, ("app", "1")))
        db = sd_model.text_processing_engine.embeddings.word_embeddings
        emb = db["<mug1>"]
        assert torch.equal(emb.vec, vec) and (emb.shape, emb.vectors) == (768, 2)
        assert cache == [None, None, None]  # stale conditioning cleared in place
        assert fakes.processing.StableDiffusionProcessingTxt2Img.cached_hr_c == [None] * 3
        with_token = sd_model.get_learned_conditioning(["a <mug1> photo"])
        _generate(applier, sd_model, _plan(folder))  # no tag: token unregistered
        assert "<mug1>" not in db
        assert not torch.equal(with_token, sd_model.get_learned_conditioning(["a <mug1> photo"]))


def test_sdxl_embedding_goes_to_both_engines():
    emb = forge.make_embedding("<t>", [torch.ones(1, 768), torch.ones(1, 1280)], "sdxl")
    assert set(emb.vec) == {"clip_l", "clip_g"} and emb.shape == 2048 and emb.vectors == 1
    model = types.SimpleNamespace(
        text_processing_engine_l=types.SimpleNamespace(embeddings=None),
        text_processing_engine_g=types.SimpleNamespace(embeddings=None),
    )
    assert len(forge.text_engines(model)) == 2
    with pytest.raises(IncompatibleModelError):
        forge.make_embedding("<t>", [torch.ones(1, 768)], "sdxl")


# --------------------------------------------------------------------------- training


def test_host_reads_the_model_through_forge_objects(sd_model):
    host = ForgeHost(sd_model, resolution=64)
    assert host.unet is _unet(sd_model) and host.family == "sd1"
    assert host.prediction_type == "epsilon" and host.alphas_cumprod.shape == (1000,)
    a, b = host.encode_image(_image()), host.encode_image(_image())
    assert a.shape == (1, 4, 8, 8) and torch.equal(a, b) and not a.is_inference()
    cond = host.encode_prompt("a photo")
    assert cond.shape == (1, 7, 32) and not cond.is_inference()
    host.prepare()
    assert not any(p.is_inference() for p in host.unet.parameters())
    x = torch.zeros(2, 4, 8, 8, requires_grad=True)
    out = host.predict_noise(x, torch.tensor([10, 20]), cond)
    out.sum().backward()  # autograd works on Forge's inference-loaded weights
    assert out.shape == (2, 4, 8, 8) and x.grad is not None
    assert host.decode_latents(a).size == (64, 64)


def test_host_refuses_quantised_storage_and_non_sd_models():
    with pytest.raises(IncompatibleModelError, match="fp8/nf4/gguf"):
        ForgeHost(FakeForgeModel(storage=torch.float8_e4m3fn))
    flux = FakeForgeModel()
    flux.is_sd1 = False
    with pytest.raises(IncompatibleModelError, match="Flux"):
        ForgeHost(flux)


def test_training_loads_the_model_and_leaves_weights_as_found(sd_model, folder, tmp_path):
    unet = _unet(sd_model)
    before = _weights(unet)
    # a previous generation left an adapter merged on the (shared) UNet
    applier = ForgeApplier()
    _generate(applier, sd_model, _plan(folder, ("app", "1")))
    assert not all(torch.equal(_weights(unet)[k], before[k]) for k in before)
    jobs = JobManager()
    job = jobs.begin()
    out = tmp_path / "out"
    out.mkdir()
    request = TrainRequest(image=_image(), name="t1", preview_every=1, preview_steps=2, **FAST)
    with fake_forge_modules(sd_model) as fakes:
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, out, applier))
        assert job.status == "done", job.error
        assert fakes.sd_models.reloads == 1  # nothing was loaded: Forge loads on demand
        assert fakes.mm.loaded[0] is sd_model.forge_objects_original.unet
        assert fakes.processing.StableDiffusionProcessing.cached_c == [None] * 3
        assert len(fakes.shared.state.images) == 2  # live previews
    after = _weights(unet)
    assert all(torch.equal(after[k], before[k]) for k in before)  # trained unpatched, untouched
    assert all(not m._forward_hooks for m in unet.modules())
    assert job.result["layers"] == 24 and (out / "t1.safetensors").is_file()
    # the new adapter applies on Forge right away
    plan = _plan(out, ("t1", "1"))
    assert plan.adapters and _generate(applier, sd_model, plan) == []


def _train_with_clip_skip(out, setting: int, engine_state: int) -> dict[str, torch.Tensor]:
    sd_model = FakeForgeModel()
    sd_model.text_processing_engine.clip_skip = engine_state
    out.mkdir()
    jobs = JobManager()
    job = jobs.begin()
    request = TrainRequest(image=_image(), name="skip", **FAST)
    with fake_forge_modules(sd_model) as fakes:
        fakes.shared.opts.CLIP_stop_at_last_layers = setting
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, out, ForgeApplier()))
    assert job.status == "done", job.error
    assert sd_model.text_processing_engine.clip_skip == setting
    return safetensors.torch.load_file(out / "skip.safetensors")


def test_training_encodes_with_the_clip_skip_setting_not_the_last_generations(tmp_path):
    """Forge sets its engines' clip skip only when a generation computes its conds, so a
    fresh server's engines hold their built-in 1 while the setting (Neo's default) says 2.
    Training must encode its prompt as generation will: the same file whatever ran before."""
    fresh, *used = (_train_with_clip_skip(tmp_path / f"s{n}", 2, n) for n in (1, 2, 3))
    assert all(torch.equal(fresh[k], f[k]) for f in used for k in fresh)
    # and the setting matters: at clip skip 1 the same training learns other offsets
    one = _train_with_clip_skip(tmp_path / "one", 1, 2)
    assert any(not torch.equal(one[k], fresh[k]) for k in one)


def test_fake_patcher_semantics():
    lin = torch.nn.Linear(3, 2)
    root = torch.nn.Module()
    root.lin = ForgeLinear(lin)
    base = FakeModelPatcher(root)
    clone = base.clone()
    assert clone.model is base.model and clone.lora_loader is base.lora_loader
    up, down = torch.ones(2, 1), torch.ones(1, 3)
    accepted = clone.add_patches(
        filename="f", patches={"lin.weight": ("lora", (up, down, 1.0, None, None)), "nope": 0}
    )
    assert accepted == {"lin.weight"} and base.lora_patches == {}
    w = root.lin.weight.detach().clone()
    clone.refresh_loras()
    assert torch.allclose(root.lin.weight, w + 1.0)
    base.refresh_loras()
    assert torch.equal(root.lin.weight, w)


def test_inplace_residuals_of_forge_blocks_train_with_the_hooks():
    class Block(torch.nn.Module):  # Forge's BasicTransformerBlock pattern
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            x = x * 1.0
            x += self.lin(self.norm1(x))
            x += self.lin(self.norm2(x))
            return x

    root = torch.nn.Module()
    root.transformer_blocks = torch.nn.ModuleList([Block()])
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        root.transformer_blocks[0](x).sum().backward()
    handles = forge.autograd_safe_hooks(root)
    assert len(handles) == 2
    root.transformer_blocks[0](x).sum().backward()
    assert x.grad is not None
    for h in handles:
        h.remove()


def test_sdxl_host_and_tokens_on_both_engines(tmp_path):
    sd_model = FakeForgeModel(family="sdxl")
    host = ForgeHost(sd_model, resolution=64)
    assert host.family == "sdxl"
    host.prepare()
    cond = host.encode_prompt("a photo")
    assert set(cond) == {"crossattn", "vector"} and not cond["vector"].is_inference()
    x = torch.zeros(2, 4, 8, 8, requires_grad=True)
    out = host.predict_noise(x, torch.tensor([10, 20]), cond)  # y = the pooled vector
    out.sum().backward()
    assert out.shape == (2, 4, 8, 8) and x.grad is not None
    host.close()
    make_adapter(tmp_path, "xlapp", _unet(sd_model), family="sdxl", seed=1)
    path = tmp_path / "xlapp.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = safetensors.torch.load_file(str(path))
    state["bundle_emb.<cup>.clip_l"] = torch.randn(1, 768)
    state["bundle_emb.<cup>.clip_g"] = torch.randn(1, 1280)
    metadata["ostaf.method"] = "object"
    safetensors.torch.save_file(state, str(path), metadata)
    registry = AdapterRegistry(lambda: tmp_path)
    requests, _ = requests_for([["xlapp", "1"]])
    plan = plan_generation(requests, registry, "sdxl")
    assert _generate(ForgeApplier(), sd_model, plan) == []
    for engine in (sd_model.text_processing_engine_l, sd_model.text_processing_engine_g):
        emb = engine.embeddings.word_embeddings["<cup>"]
        assert set(emb.vec) == {"clip_l", "clip_g"} and emb.shape == 2048
    assert len(sd_model.forge_objects.unet.lora_patches) == 1


# --------------------------------------------------------------------------- the forks
# Forge Neo, Forge Classic, reForge (docs/forge.md "Forks"); fakes written from each host's code.


def _expected_merge(unet, before, plan):
    """W + Σ λ·(alpha/rank)·up @ down per layer, from the file's factors (not our merge)."""
    info = inspect_unet(unet)
    want = {k: v.clone() for k, v in before.items()}
    for planned in plan.adapters:
        for key, m in planned.adapter.modules.items():
            name = module_name_from_kohya(key, info) + ".weight"
            factor = float(m.alpha) / m.down.shape[0]
            want[name] += planned.weight * factor * (m.up.float() @ m.down.float())
    return want


def _worst(after, want):
    return max((after[k] - want[k]).abs().max().item() for k in want)


def test_neo_fake_rejects_forge2_tuples_like_neo():
    root = torch.nn.Module()
    root.lin = ForgeLinear(torch.nn.Linear(3, 2))
    patcher = FakeNeoModelPatcher(root)
    up, down = torch.ones(2, 1), torch.ones(1, 3)
    tup = {"lin.weight": ("lora", (up, down, 1.0, None, None))}
    patcher.add_patches(tup, 1.0, filename="f", online_mode=False)
    with pytest.raises(ValueError, match='of type "lora" is not recognized'):
        patcher.refresh_loras()
    assert forge.lora_adapter_class() is None  # nothing of Neo's is importable here
    with fake_neo_modules():
        assert forge.lora_adapter_class() is FakeLoRAAdapter


def test_neo_gets_its_weight_adapter_objects_and_restores_exactly(folder):
    sd_model = FakeForgeModel(patcher_cls=FakeNeoModelPatcher)
    unet = _unet(sd_model)
    make_adapter(folder, "app", unet, seed=1)  # the folder's files, for this model
    make_adapter(folder, "shp", unet, attribute="shape", seed=2)
    before = _weights(unet)
    applier = ForgeApplier()
    plan = _plan(folder, ("app", "0.7"), ("shp", "-1.3"))
    with fake_neo_modules():
        assert _generate(applier, sd_model, plan) == []
        patched = sd_model.forge_objects.unet
        assert patched.patches == {}  # Neo's LoRA path (online_mode given), as its <lora:>
        ids = [k for k in patched.lora_patches if k[0].startswith("ostaf:")]
        assert len(ids) == 2 and all(k[3] is False for k in ids)  # online_mode=False
        kinds = {type(e[1]) for p in patched.lora_patches.values() for v in p.values() for e in v}
        assert kinds == {FakeLoRAAdapter}
        want = _expected_merge(unet, before, plan)
        assert _worst(_weights(unet), want) < 1e-6
        _generate(applier, sd_model, _plan(folder))  # no tags: restored bit-exactly
        assert all(torch.equal(_weights(unet)[k], before[k]) for k in before)


def test_forge2_keeps_tuples_and_gets_online_mode_false(sd_model, folder):
    applier = ForgeApplier()
    _generate(applier, sd_model, _plan(folder, ("app", "1")))
    (ident,) = sd_model.forge_objects.unet.lora_patches
    assert ident[3] is False
    (plist,) = list(sd_model.forge_objects.unet.lora_patches[ident].values())[:1]
    assert plist[0][1][0] == "lora"


@pytest.mark.parametrize("flavour", ["classic", "reforge"])
def test_old_forge_forks_merge_lambda_delta_and_restore(flavour, tmp_path, caplog):
    sd_model = FakeLdmForgeModel(flavour)
    unet = _unet(sd_model)
    make_adapter(tmp_path, "app", unet, seed=1)
    make_adapter(tmp_path, "shp", unet, attribute="shape", seed=2)
    before = _weights(unet)
    applier = ForgeApplier()
    plan = _plan(tmp_path, ("app", "0.7"), ("shp", "-1.3"))
    with fake_ldm_forge_modules(sd_model, flavour) as fakes, caplog.at_level("WARNING"):
        want_cls = FakeLoRAAdapter if flavour == "reforge" else None
        assert forge.lora_adapter_class() is want_cls
        assert _generate_ldm(applier, sd_model, plan, fakes.mm) == []
        assert "patch type not recognized" not in caplog.text
        assert _worst(_weights(unet), _expected_merge(unet, before, plan)) < 1e-6
        _generate_ldm(applier, sd_model, _plan(tmp_path), fakes.mm)
        assert all(torch.equal(_weights(unet)[k], before[k]) for k in before)


def test_reforge_fake_ignores_tuples_like_reforge(tmp_path, caplog):
    sd_model = FakeLdmForgeModel("reforge")
    unet = _unet(sd_model)
    before = _weights(unet)
    key = next(k for k in before if k.endswith("attn2.to_k.weight"))
    w = before[key]
    tup = ("lora", (torch.ones(w.shape[0], 1), torch.ones(1, w.shape[1]), 1.0, None, None))
    patcher = sd_model.forge_objects.unet.clone()
    assert patcher.add_patches({"diffusion_model." + key: tup}, 1.0)
    with caplog.at_level("WARNING"):
        patcher.patch_model()
    assert "patch type not recognized lora" in caplog.text
    assert torch.equal(_weights(unet)[key], w)  # silently unchanged


def _generate_ldm(applier, sd_model, plan, mm):
    """One batch on old Forge: reset → activate → process_before_every_sampling → the
    sampler loads ``forge_objects.unet`` with model management (unpatching the last one)."""
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    messages = applier.apply(sd_model, plan.adapters)
    messages += applier.patch_unet(_P(sd_model))
    mm.load_model_gpu(sd_model.forge_objects.unet)
    return messages


@pytest.mark.parametrize("flavour", ["classic", "reforge"])
def test_training_on_old_forge_without_backend(flavour, tmp_path):
    sd_model = FakeLdmForgeModel(flavour)
    unet = _unet(sd_model)
    before = _weights(unet)
    make_adapter(tmp_path, "app", unet, seed=1)
    applier = ForgeApplier()
    out = tmp_path / "out"
    out.mkdir()
    request = TrainRequest(image=_image(), name="t1", preview_every=1, preview_steps=2, **FAST)
    jobs = JobManager()
    job = jobs.begin()
    with fake_ldm_forge_modules(sd_model, flavour) as fakes:
        with pytest.raises(ModuleNotFoundError):
            __import__("backend")
        assert forge.memory_management() is fakes.mm
        _generate_ldm(applier, sd_model, _plan(tmp_path, ("app", "1")), fakes.mm)
        assert not all(torch.equal(_weights(unet)[k], before[k]) for k in before)
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, out, applier))
        assert job.status == "done", job.error
        assert fakes.mm.loaded[-1] is sd_model.forge_objects_original.unet
        after = _weights(unet)
        assert all(torch.equal(after[k], before[k]) for k in before)  # unpatched, untouched
        assert job.result["layers"] > 0 and (out / "t1.safetensors").is_file()


def test_object_tokens_on_old_forge_use_the_a1111_database(tmp_path):
    sd_model = FakeLdmForgeModel("classic")
    make_adapter(tmp_path, "app", _unet(sd_model), seed=1)
    vec = torch.randn(2, 768)
    _bundle(tmp_path / "app.safetensors", "<mug1>", vec)
    applier = ForgeApplier()
    with fake_ldm_forge_modules(sd_model) as fakes:
        cache = fakes.processing.StableDiffusionProcessing.cached_c
        with torch.inference_mode():
            plain = sd_model.get_learned_conditioning(["a <mug1> photo"])
        assert _generate_ldm(applier, sd_model, _plan(tmp_path, ("app", "1")), fakes.mm) == []
        emb = sd_model.embedding_db.word_embeddings["<mug1>"]
        assert torch.equal(emb.vec, vec) and (emb.shape, emb.vectors) == (768, 2)
        assert cache == [None, None, None]
        with torch.inference_mode():
            tagged = sd_model.get_learned_conditioning(["a <mug1> photo"])
        assert not torch.equal(tagged, plain)
        _generate_ldm(applier, sd_model, _plan(tmp_path), fakes.mm)  # no tag: unregistered
        assert "<mug1>" not in sd_model.embedding_db.word_embeddings
        _generate_ldm(applier, sd_model, _plan(tmp_path, ("app", "1")), fakes.mm)
        applier.reset(sd_model)  # script unloaded
        assert sd_model.embedding_db.word_embeddings == {}


def test_old_forge_host_trains_token_vectors_through_a1111_text(tmp_path):
    sd_model = FakeLdmForgeModel("reforge")
    with fake_ldm_forge_modules(sd_model, "reforge"):
        host = ForgeHost(sd_model, resolution=64)
        assert [t.width for t in host.text_encoders] == [768]
        vecs = [torch.nn.Parameter(torch.randn(1, 768) * 0.02)]
        plain = host.encode_prompt("a photo of <mug1>")
        cond = host.encode_prompt("a photo of <mug1>", {"<mug1>": vecs})
        assert cond.shape == plain.shape and not torch.allclose(cond, plain)
        cond.square().sum().backward()
        assert vecs[0].grad is not None and vecs[0].grad.abs().sum() > 0
        assert sd_model.embedding_db.word_embeddings == {}  # registered for the call only
        assert host.prediction_type == "epsilon"


def test_object_training_on_old_forge_and_tokens_apply(tmp_path):
    from lib_ostaf.method.embeddings import load_embedding
    from lib_ostaf.webui.object_job import ObjectRequest

    from .conftest import disc_image

    sd_model = FakeLdmForgeModel("classic")
    unet, text = _unet(sd_model), sd_model.cond_stage_model
    before = _weights(unet) | {f"te.{k}": v for k, v in _weights(text).items()}
    request = ObjectRequest(
        image=disc_image(),
        name="mug",
        tokens=["<mug1>"],
        classes=["mug"],
        preview_every=1,
        steps=2,
        embedding_steps=1,
        lr=1e-2,
        embedding_lr=1e-2,
        resolution=64,
        sweep=(0.0, 1.0),
    )
    applier = ForgeApplier()
    jobs = JobManager()
    with fake_ldm_forge_modules(sd_model) as fakes:
        job = jobs.begin("objects")
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, tmp_path, applier))
        assert job.status == "done", job.error
        after = _weights(unet) | {f"te.{k}": v for k, v in _weights(text).items()}
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert sd_model.embedding_db.word_embeddings == {}
        _, trained = load_embedding(job.result["embeddings"]["<mug1>"], "sd1")
        host = ForgeHost(sd_model, resolution=64)
        want = host.encode_prompt("a photo of <mug1>", {"<mug1>": list(trained)})
        plan = _plan(tmp_path, ("mug", "1"))
        assert _generate_ldm(applier, sd_model, plan, fakes.mm) == []
        got = host.encode_prompt("a photo of <mug1>")
        assert torch.allclose(got, want, atol=1e-5)


def test_each_part_is_patched_with_its_own_lambda(sd_model, folder):
    import json

    unet = _unet(sd_model)
    make_adapter(folder, "duo", unet, attribute="shape+appearance", seed=3)
    before = _weights(unet)
    applier = ForgeApplier()
    weights = {"shape": -0.5, "appearance": 2.0}
    plan = _plan(folder, ("duo", "1", "shape=-0.5", "appearance=2"))
    assert _generate(applier, sd_model, plan) == []
    adapter = plan.adapters[0].adapter
    info = inspect_unet(unet)
    after = _weights(unet)
    worst = 0.0
    for part, keys in json.loads(adapter.metadata["ostaf.parts"]).items():
        for key in keys:
            name = module_name_from_kohya(key, info) + ".weight"
            want = before[name] + weights[part] * adapter.modules[key].delta()
            worst = max(worst, (after[name] - want).abs().max().item())
    assert worst < 1e-6
    _generate(applier, sd_model, _plan(folder))
    assert all(torch.equal(_weights(unet)[k], before[k]) for k in before)
