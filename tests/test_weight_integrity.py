"""Weight integrity (reliability issue, item 2): randomized sequences of generations that mix
``<ostaf:…>`` (several adapters, any λ), the WebUI's own ``<lora:…>``, no tags, broken or
foreign files, unknown names, bad λ, object tokens, interrupted generations and a training
run end with every UNet and text-encoder weight bit-identical to the pristine copy and the
embedding database as it was. Three appliers: A1111 riding the built-in Lora, A1111's
fallback merge (Lora disabled), Forge's patcher."""

from __future__ import annotations

import random

import pytest
import safetensors.torch
import torch
from PIL import Image

from lib_ostaf.files.naming import inspect_unet, module_name_from_kohya
from lib_ostaf.hosts.a1111 import A1111Applier, train_on_loaded_model
from lib_ostaf.hosts.forge import ForgeApplier
from lib_ostaf.webui.activation import plan_generation, requests_for
from lib_ostaf.webui.jobs import JobManager
from lib_ostaf.webui.registry import AdapterRegistry
from lib_ostaf.webui.training_job import TrainRequest

from .conftest import pristine, same_weights
from .forge_fakes import FakeForgeModel
from .webui_fakes import FakeLora, FakeSdModel, fake_modules, make_adapter

SEQUENCES = 100
OSTAF = ("app", "shp", "obj", "xl", "broken", "missing")  # the last three are refused
LAMBDAS = ("1", "0", "-0.7", "2.5", "0.3", "abc", "")


pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(tmp_path, unet):
    make_adapter(tmp_path, "app", unet, seed=1)
    make_adapter(tmp_path, "shp", unet, attribute="shape", seed=2)
    make_adapter(tmp_path, "xl", unet, family="sdxl", seed=3)
    make_adapter(tmp_path, "user_lora", unet, seed=4)
    obj = make_adapter(tmp_path, "obj", unet, seed=5)
    with safetensors.safe_open(str(obj), "pt") as f:
        metadata = f.metadata()
    state = safetensors.torch.load_file(str(obj)) | {
        "bundle_emb.<mug1>.emb_params": torch.randn(1, 24) * 0.02
    }
    safetensors.torch.save_file(state, str(obj), metadata | {"ostaf.method": "object"})
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return tmp_path


def _tags(rng: random.Random) -> list[list[str]]:
    tags = []
    for _ in range(rng.randint(0, 3)):
        name, lam = rng.choice(OSTAF), rng.choice(LAMBDAS)
        tags.append([name, lam] if lam else [name])
    return tags


def _plan(folder, tags, family="sd1"):
    requests, messages = requests_for(tags)
    return plan_generation(requests, AdapterRegistry(folder), family, messages)


@pytest.mark.parametrize("path", ["lora", "fallback"])
def test_a1111_sequences_end_bit_identical(tmp_path, path):
    sd_model = FakeSdModel()
    folder = _folder(tmp_path, sd_model.model.diffusion_model)
    lora = FakeLora(sd_model) if path == "lora" else None
    applier = A1111Applier(networks=lora, embeddings=sd_model.embedding_db)
    base = pristine(sd_model)
    user_lora = ("user_lora", str(folder / "user_lora.safetensors"))
    modules = list(sd_model.network_layer_mapping.values()) if lora else []
    generations = interrupted = 0
    for seed in range(SEQUENCES):
        rng = random.Random(seed)
        for _ in range(rng.randint(1, 5)):
            generations += 1
            if lora is not None:  # Lora's activate rebuilds its set first, every batch
                mult = rng.choice((0.0, 0.5, 1.0))
                lora.activate_lora([(*user_lora, mult)] if rng.random() < 0.4 else [])
            applier.apply(sd_model, _plan(folder, _tags(rng)).adapters)
            if lora is None:
                continue  # the fallback merges inside apply
            if rng.random() < 0.2:  # interrupted: only some layers saw a forward
                interrupted += 1
                for module in modules[: rng.randrange(len(modules))]:
                    lora.network_apply_weights(module)
            else:
                lora.forward_all()
        # the sequence ends with a plain generation: no tags, no Lora
        if lora is not None:
            lora.activate_lora([])
        applier.apply(sd_model, [])
        if lora is not None:
            lora.forward_all()
        assert same_weights(sd_model, base), f"sequence {seed} drifted"
        assert sd_model.embedding_db.word_embeddings == {}, f"sequence {seed} left a token"
    assert generations > 250 and (interrupted > 20 or lora is None)


def test_a1111_training_between_generations_leaves_weights_exact(tmp_path):
    sd_model = FakeSdModel()
    folder = _folder(tmp_path, sd_model.model.diffusion_model)
    lora = FakeLora(sd_model)
    applier = A1111Applier(networks=lora, embeddings=sd_model.embedding_db)
    base = pristine(sd_model)
    lora.activate_lora([("user_lora", str(folder / "user_lora.safetensors"), 1.0)])
    applier.apply(sd_model, _plan(folder, [["app", "2"], ["obj"]]).adapters)
    lora.forward_all()  # merged state when training starts
    jobs = JobManager()
    request = TrainRequest(
        image=Image.new("RGB", (64, 64), (200, 40, 40)),
        name="t",
        steps=1,
        resolution=64,
        n_views=1,
        sweep=(0.0, 1.0),
    )
    with fake_modules(sd_model, lora=lora):
        job = jobs.begin()
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, folder, applier))
    assert job.status == "done", job.error
    assert same_weights(sd_model, base)  # trained on the checkpoint's own weights
    applier.apply(sd_model, _plan(folder, [["t", "3"], ["shp"]]).adapters)
    lora.forward_all()
    lora.activate_lora([])
    applier.apply(sd_model, [])
    lora.forward_all()
    assert same_weights(sd_model, base)


def test_forge_sequences_end_bit_identical(tmp_path):
    sd_model = FakeForgeModel()
    unet = sd_model.forge_objects.unet.model.diffusion_model
    folder = _folder(tmp_path, unet)
    info = inspect_unet(unet)
    user = _plan(folder, [["user_lora"]]).adapters[0].adapter
    user_patches = {
        f"diffusion_model.{module_name_from_kohya(k, info)}.weight": (
            "lora",
            (m.up, m.down, m.alpha, None, None),
        )
        for k, m in user.modules.items()
    }
    original = sd_model.forge_objects_after_applying_lora.unet
    applier = ForgeApplier()
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    engine = sd_model.text_processing_engine

    class P:
        def __init__(self) -> None:
            self.sd_model = sd_model

    for seed in range(SEQUENCES):
        rng = random.Random(seed)
        for _ in range(rng.randint(1, 5)):
            patched = original
            if rng.random() < 0.4:  # Forge's own <lora:…>: a clone with its patches
                patched = original.clone()
                patched.add_patches(
                    filename="user_lora.safetensors",
                    patches=user_patches,
                    strength_patch=rng.choice((0.5, 1.0)),
                )
            sd_model.forge_objects_after_applying_lora.unet = patched
            sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
            applier.apply(sd_model, _plan(folder, _tags(rng)).adapters)
            applier.patch_unet(P())
            if rng.random() > 0.2:  # else interrupted before sampling loaded the UNet
                sd_model.forge_objects.unet.refresh_loras()
        sd_model.forge_objects_after_applying_lora.unet = original
        sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
        applier.apply(sd_model, [])
        applier.patch_unet(P())
        sd_model.forge_objects.unet.refresh_loras()
        now = unet.state_dict()
        assert all(torch.equal(now[k], weights[k]) for k in weights), f"sequence {seed} drifted"
        assert engine.embeddings.word_embeddings == {}, f"sequence {seed} left a token"
