"""Object implantation inside A1111 (fakes of the WebUI with its embedding-database
semantics): new tokens reach the conditioning through A1111's own textual-inversion path,
gradients reach their vectors, training leaves model and database as found, and an active
object adapter makes its tokens available (and only while it is active)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lib_ostaf.errors import InputError
from lib_ostaf.hosts.a1111 import A1111Applier, A1111Host, train_on_loaded_model
from lib_ostaf.method.embeddings import load_embedding
from lib_ostaf.webui.activation import plan_generation, requests_for
from lib_ostaf.webui.jobs import JobManager
from lib_ostaf.webui.object_job import ObjectRequest
from lib_ostaf.webui.registry import AdapterRegistry

from .conftest import disc_image, pristine, same_weights
from .webui_fakes import FakeSdModel, FakeSdxlModel, fake_modules

FAST = {
    "steps": 3,
    "embedding_steps": 2,
    "lr": 1e-2,
    "embedding_lr": 1e-2,
    "resolution": 64,
    "sweep": (0.0, 1.0),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _image() -> Image.Image:
    g = torch.Generator().manual_seed(3)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())


def _halves() -> list[Image.Image]:
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    return [Image.fromarray(left), Image.fromarray(255 - left)]


def _pair_request(**extra) -> ObjectRequest:
    """Two objects, a mug and a cup, on the two halves of :func:`_image`."""
    return ObjectRequest(
        image=_image(),
        name="pair",
        tokens=["<mug1>", "<cup2>"],
        classes=["mug", "cup"],
        masks=_halves(),
        **FAST,
        **extra,
    )


def _host(sd_model) -> A1111Host:
    host = A1111Host(sd_model, resolution=64)
    host._embedding_db = sd_model.embedding_db
    return host


@pytest.mark.parametrize("model_cls", [FakeSdModel, FakeSdxlModel])
def test_token_vectors_reach_the_conditioning_with_gradients(model_cls):
    sd_model = model_cls()
    host = _host(sd_model)
    widths = [e.width for e in host.text_encoders]
    assert widths == ([24] if model_cls is FakeSdModel else [24, 20])
    assert host.text_encoders[0].has_token("dog") and not host.text_encoders[0].has_token("<mug1>")
    table = sd_model.cond_stage_model.token_embedding if model_cls is FakeSdModel else None
    if table is not None:
        rows = host.text_encoders[0].word_vectors("dog")
        ids = sd_model.cond_stage_model.tokenize(["dog"])[0]
        assert torch.equal(rows, table.weight[ids].detach())

    vecs = [torch.nn.Parameter(torch.randn(1, w)) for w in widths]
    plain = host.encode_prompt("a photo of <mug1>")
    cond = host.encode_prompt("a photo of <mug1>", {"<mug1>": vecs})
    cross = cond["crossattn"] if isinstance(cond, dict) else cond
    plain_cross = plain["crossattn"] if isinstance(plain, dict) else plain
    assert not torch.allclose(cross, plain_cross)  # the vectors, not the token's pieces
    cross.square().sum().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vecs)  # each encoder
    assert sd_model.embedding_db.word_embeddings == {}  # registered for the call only
    if model_cls is FakeSdxlModel:  # sgm's no_grad switch is back
        assert not any(e.is_trainable for e in sd_model.conditioner.embedders[:2])
    # a user's embedding of the same name comes back after the call
    mine = type("E", (), {"vec": torch.zeros(1, 24), "name": "<mug1>"})()
    sd_model.embedding_db.register_embedding_by_name(mine, sd_model, "<mug1>")
    host.encode_prompt("a photo of <mug1>", {"<mug1>": vecs})
    assert sd_model.embedding_db.word_embeddings["<mug1>"] is mine


@pytest.mark.parametrize("model_cls", [FakeSdModel, FakeSdxlModel])
def test_object_training_in_the_webui_leaves_model_and_database_as_found(tmp_path, model_cls):
    sd_model = model_cls()
    before = pristine(sd_model)
    flags = {n: p.requires_grad for n, p in sd_model.named_parameters()}
    jobs = JobManager()
    request = _pair_request()
    with fake_modules(sd_model) as shared:
        job = jobs.begin("objects")
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, tmp_path, A1111Applier()))
    assert job.status == "done", job.error
    result = job.result
    assert result["tokens"] == ["<mug1>", "<cup2>"] and result["steps"] == 5
    # the WebUI's progress bar saw every step, then the λ sweep (2 images × 12 steps)
    assert shared.state.sampling_step == shared.state.sampling_steps == 5 + 2 * 12
    assert same_weights(sd_model, before)  # UNet and text encoders bit-identical
    assert {n: p.requires_grad for n, p in sd_model.named_parameters()} == flags
    assert sd_model.embedding_db.word_embeddings == {}
    assert "sweep" in job.images and job.images["sweep"].size[0] == 2 * 64
    lora = tmp_path / "pair.safetensors"
    assert lora.exists() and (tmp_path / "pair.preview.png").exists()
    family = "sdxl" if model_cls is FakeSdxlModel else "sd1"
    for token in ("<mug1>", "<cup2>"):
        _, vectors = load_embedding(result["embeddings"][token], family)
        assert len(vectors) == (2 if family == "sdxl" else 1)
        word = "mug" if token == "<mug1>" else "cup"
        start = _host(sd_model).text_encoders[0].word_vectors(word).mean(0, keepdim=True)
        assert not torch.allclose(vectors[0], start)  # the vectors were trained


def test_active_object_adapter_makes_its_tokens_available(tmp_path):
    sd_model = FakeSdModel()
    jobs = JobManager()
    request = ObjectRequest(
        image=disc_image(), name="mug", tokens=["<mug1>"], classes=["mug"], **FAST
    )
    applier = A1111Applier(embeddings=sd_model.embedding_db)
    with fake_modules(sd_model):
        job = jobs.begin("objects")
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, tmp_path, applier))
        assert job.status == "done", job.error
        assert (tmp_path / "mug.mask-mug1.png").exists()  # the automatic mask, for correction
        registry = AdapterRegistry(tmp_path)
        assert registry.names() == ["mug"]  # embeddings and masks are not adapters
        host = _host(sd_model)
        _, trained = load_embedding(job.result["embeddings"]["<mug1>"], "sd1")
        want = host.encode_prompt("a photo of <mug1>", {"<mug1>": trained})
        without = host.encode_prompt("a photo of <mug1>")

        reqs, msgs = requests_for([["mug", "1"]], [])
        plan = plan_generation(reqs, registry, "sd1", msgs)
        assert applier.apply(sd_model, plan.adapters) == []
        assert "<mug1>" in sd_model.embedding_db.word_embeddings
        assert torch.allclose(host.encode_prompt("a photo of <mug1>"), want, atol=1e-6)

        applier.apply(sd_model, [])  # the next generation has no tag: the token is gone
        assert sd_model.embedding_db.word_embeddings == {}
        assert torch.equal(host.encode_prompt("a photo of <mug1>"), without)
        applier.apply(sd_model, plan.adapters)
        applier.reset(sd_model)
        assert sd_model.embedding_db.word_embeddings == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": None}, "no image"),
        ({"masks": [_halves()[0], None]}, "no mask for <cup2>"),
        ({"tokens": ["<a1>"] * 5, "classes": ["a"] * 5, "masks": []}, "at most 4"),
        ({"tokens": ["a b", "<cup2>"]}, "one word"),
        ({"classes": ["mug"]}, "class name"),
        ({"name": "../escape"}, "name"),
        ({"steps": 0}, "steps"),
        ({"sweep": (0.0, float("nan"))}, "λ"),
        ({"masks": [Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 255)]}, "empty"),
    ],
)
def test_bad_object_requests_are_refused_before_training(tmp_path, change, message):
    data = {
        "image": _image(),
        "name": "pair",
        "tokens": ["<mug1>", "<cup2>"],
        "classes": ["mug", "cup"],
        "masks": _halves(),
        **FAST,
    } | change
    with pytest.raises(InputError, match=message):
        ObjectRequest(**data).validate(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_files_are_refused_and_kept(tmp_path):
    (tmp_path / "pair.safetensors").write_bytes(b"mine")
    request = ObjectRequest(image=_image(), name="pair", tokens=["<mug1>"], classes=["mug"], **FAST)
    with pytest.raises(InputError, match="already exist"):
        request.validate(tmp_path)
    assert (tmp_path / "pair.safetensors").read_bytes() == b"mine"


def _webui_tower(sd_model, folder):
    """A tiny full CLIPModel whose text tower has the fake SD1 encoder's token table (as
    openai/clip-vit-large-patch14 has SD1's), saved as a model folder."""
    from transformers import CLIPConfig, CLIPModel

    from lib_ostaf.world import tiny

    table = sd_model.cond_stage_model.token_embedding.weight
    text = {
        "vocab_size": table.shape[0],
        "hidden_size": table.shape[1],
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "bos_token_id": table.shape[0] - 2,
        "eos_token_id": table.shape[0] - 1,
        "pad_token_id": table.shape[0] - 1,
    }
    torch.manual_seed(5)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=tiny.VISION, projection_dim=16))
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight.copy_(table)
    model.save_pretrained(folder)
    return folder


def _implant(sd_model, tmp_path, **extra):
    import json

    jobs = JobManager()
    request = _pair_request(**extra)
    with fake_modules(sd_model):
        job = jobs.begin("objects")
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, tmp_path, A1111Applier()))
    assert job.status == "done", job.error
    card = json.loads((tmp_path / "pair.json").read_text())
    return "\n".join(job.log), card


def test_object_job_uses_the_tower_the_setting_points_to(tmp_path):
    sd_model = FakeSdModel()
    folder = _webui_tower(sd_model, tmp_path / "tower")
    log, card = _implant(sd_model, tmp_path / "out", clip=str(folder))
    assert "prototypical embedding (clip_l) from CLIP image tower" in log
    assert "<mug1>: prototypical embedding (clip_l), cosine to the prototype" in log
    assert "fell back" not in log
    assert f"prototypical embedding (clip_l) from CLIP image tower {folder}" in card["notes"]


def test_object_job_auto_finds_an_image_encoder_folder(tmp_path, monkeypatch):
    sd_model = FakeSdModel()
    _webui_tower(sd_model, tmp_path / "models" / "clip_vision" / "mine")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    log, card = _implant(sd_model, tmp_path / "out", clip_dirs=(str(tmp_path / "models"),))
    assert "found automatically" in log and "prototypical embedding (clip_l)" in card["notes"]


def test_object_job_falls_back_to_the_class_word_and_says_why(tmp_path, monkeypatch):
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    sd_model = FakeSdModel()
    other = FakeSdModel(seed=1)  # a CLIP whose text tower is not the loaded encoder
    _webui_tower(other, tmp_path / "models" / "clip_vision" / "other")
    log, card = _implant(sd_model, tmp_path / "out", clip_dirs=(str(tmp_path / "models"),))
    assert "fell back to the class word" in log and "fell back to the class word" in card["notes"]
    assert "is not the loaded clip_l" in log  # the reason the found tower was not used


def test_a_tower_setting_that_is_no_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        ObjectRequest(
            image=_image(), name="x", tokens=["<a1>"], classes=["mug"], clip=str(tmp_path / "no")
        ).validate(tmp_path)
    with pytest.raises(InputError, match="clip_dirs"):
        ObjectRequest.from_dict({"image": None, "name": "x", "clip_dirs": ["/"]})
