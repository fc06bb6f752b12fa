"""The one-shot trainer on the embedded tiny SD1 model: numbers, not smoke."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from lib_ostaf.errors import InputError, Interrupted, ModelNotFinite, TrainingDiverged
from lib_ostaf.files.adapter_file import load_adapter, load_state
from lib_ostaf.method.targets import default_blocks
from lib_ostaf.method.train import AttributeConfig, Callbacks, export, train_attribute

from .conftest import DEMO_IMAGE, pristine, same_weights

FAST = {"steps": 25, "lr": 1e-3, "n_views": 4}


@pytest.fixture(scope="module")
def trained(sd1_host, reference_image):
    before = pristine(sd1_host.unet)
    result = train_attribute(
        sd1_host, reference_image, AttributeConfig(attribute="appearance", **FAST)
    )
    return result, before


def test_loss_falls_and_model_left_as_found(sd1_host, trained):
    result, before = trained
    assert result.probe_loss_after < 0.97 * result.probe_loss_before
    assert same_weights(sd1_host.unet, before)
    assert not any(p.requires_grad for p in sd1_host.unet.parameters())
    assert not sd1_host.unet.training
    # no hooks left behind
    assert all(not m._forward_hooks for m in sd1_host.unet.modules())


def test_training_is_deterministic(sd1_host, reference_image, trained):
    result, _ = trained
    again = train_attribute(
        sd1_host, reference_image, AttributeConfig(attribute="appearance", **FAST)
    )
    assert again.losses == result.losses
    for key, (a, b) in result.factors().items():
        a2, b2 = again.factors()[key]
        assert torch.equal(a, a2) and torch.equal(b, b2)


@pytest.mark.parametrize("attribute", ["shape", "appearance"])
def test_offsets_only_in_the_attributes_blocks(sd1_host, reference_image, attribute):
    result = train_attribute(
        sd1_host, reference_image, AttributeConfig(attribute=attribute, steps=3, lr=1e-3, n_views=2)
    )
    blocks = default_blocks(sd1_host.unet, attribute)
    modules = result.lora_modules()
    keys = {"lora_unet_" + b.replace(".", "_") for b in blocks}
    assert modules and all(key.startswith(tuple(keys)) for key in modules)
    assert {t.block for t in result.targets} == set(blocks)
    assert any(m.up.abs().sum() > 0 for m in modules.values())  # it learned something
    # merge: every weight outside the attribute's blocks is bit-identical
    saved = pristine(sd1_host.unet)
    sd1_host.patcher.apply([("t", _deltas(sd1_host, result), 1.0)])
    try:
        state = sd1_host.unet.state_dict()
        changed = [k for k in saved if not torch.equal(state[k], saved[k])]
        assert changed and all(k.startswith(blocks) for k in changed)
    finally:
        sd1_host.patcher.restore()
    assert same_weights(sd1_host.unet, saved)


def _deltas(host, result):
    from lib_ostaf.method.targets import find_module  # noqa: F401

    names = {t.kohya: t.name for t in result.targets}
    return {names[k]: m.delta() for k, m in result.lora_modules().items()}


def test_adapter_changes_image_at_one_not_at_zero(sd1_host, trained, tmp_path):
    result, before = trained
    path = export(result, tmp_path, "app")
    adapter = load_adapter(path)
    base = sd1_host.generate("a photo of a ostafv textured object", seed=3, steps=4)
    sd1_host.apply_adapters([(adapter, 0.0)])
    at_zero = sd1_host.generate("a photo of a ostafv textured object", seed=3, steps=4)
    sd1_host.apply_adapters([(adapter, 1.0)])
    at_one = sd1_host.generate("a photo of a ostafv textured object", seed=3, steps=4)
    sd1_host.apply_adapters([])
    assert at_zero.tobytes() == base.tobytes()
    diff = torch.tensor(list(at_one.tobytes()), dtype=torch.float) - torch.tensor(
        list(base.tobytes()), dtype=torch.float
    )
    assert diff.abs().mean() > 0.5  # mean absolute change in 8-bit levels
    assert same_weights(sd1_host.unet, before)


def test_export_writes_file_state_and_card(trained, tmp_path):
    result, _ = trained
    path = export(result, tmp_path, "my adapter", save_state=True)
    adapter = load_adapter(path)
    assert adapter.metadata["ss_output_name"] == "my adapter"
    assert adapter.metadata["ostaf.attribute"] == "appearance"
    assert adapter.family == "sd1"
    assert set(adapter.modules) == {t.kohya for t in result.targets}
    for key, (a, b) in result.factors().items():  # exact: ΔW = B·A, alpha = rank
        torch.testing.assert_close(adapter.modules[key].delta(), b @ a, rtol=0, atol=0)
    tensors, config = load_state(tmp_path / "my adapter.ostaf-state")
    assert config["network"] == "hypernet"
    assert set(tensors) == set(result.network.state_dict())
    import json

    card = json.loads((tmp_path / "my adapter.json").read_text())
    assert card["preferred weight"] == 1.0 and card["activation text"] == "ostafv"
    # refuse to overwrite; nothing touched
    files = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    with pytest.raises(InputError, match="already exist"):
        export(result, tmp_path, "my adapter")
    assert before == files()
    with pytest.raises(InputError):
        export(result, tmp_path, "../escape")


def test_appearance_learns_its_placeholder_and_lambda_scales_it(sd1_host, trained, tmp_path):
    from lib_ostaf.method.embeddings import adapter_embeddings, scaled_embeddings
    from lib_ostaf.method.train import TOKEN_INIT

    result, _ = trained
    (vec,) = result.embeddings["ostafv"]
    (start,) = result.token_init["ostafv"]
    encoders = sd1_host.text_encoders
    torch.testing.assert_close(start, encoders[0].word_vectors(TOKEN_INIT).mean(0, keepdim=True))
    assert vec.shape == (1, encoders[0].width) and (vec - start).norm() > 1e-3  # it moved
    adapter = load_adapter(export(result, tmp_path, "tok"))
    assert json.loads(adapter.metadata["ostaf.embeddings"]) == {
        "ostafv": "tok.embeddings/ostafv.safetensors"
    }
    found = adapter_embeddings(adapter, "sd1")
    torch.testing.assert_close(found["ostafv"][0], vec, rtol=0, atol=0)
    for lam in (0.0, 0.5, 1.0, 1.5):
        (got,) = scaled_embeddings(adapter, found, lam, encoders)["ostafv"]
        t = min(lam, 1.0)  # the token is clamped to [0, 1]; beyond, only ΔW grows
        torch.testing.assert_close(got, start + t * (vec - start))
    # shape learns no vector by default; token_lr=0 turns it off for appearance too
    assert AttributeConfig(attribute="shape").token_lr_ == 0
    off = train_attribute(
        sd1_host,
        DEMO_IMAGE,
        AttributeConfig(attribute="appearance", steps=1, n_views=1, token_lr=0),
    )
    assert off.embeddings == {} and off.token_init == {}
    assert not (tmp_path / "off.embeddings").exists()


def test_state_sidecar_is_opt_in(trained, tmp_path):
    result, _ = trained
    export(result, tmp_path, "plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "plain.embeddings",  # the learned placeholder (appearance)
        "plain.json",
        "plain.safetensors",
    ]
    # an old sidecar still counts as taken (never left describing another adapter) ...
    (tmp_path / "old.ostaf-state").write_bytes(b"x")
    with pytest.raises(InputError, match="already exist"):
        export(result, tmp_path, "old")
    # ... and overwriting without save_state removes it
    export(result, tmp_path, "old", overwrite=True)
    assert not (tmp_path / "old.ostaf-state").exists() and (tmp_path / "old.safetensors").exists()
    export(result, tmp_path, "old", overwrite=True, save_state=True)
    load_state(tmp_path / "old.ostaf-state")


def test_retraining_replaces_the_card_preview(trained, tmp_path):
    result, _ = trained
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    export(result, tmp_path, "card", preview=red)
    export(result, tmp_path, "card", preview=blue, overwrite=True)
    assert Image.open(tmp_path / "card.preview.png").getpixel((0, 0)) == (0, 0, 255)
    export(result, tmp_path, "card", overwrite=True)  # no picture this time (empty sweep)
    assert not (tmp_path / "card.preview.png").exists()  # never the earlier adapter's


def test_interrupt_writes_nothing_and_restores(sd1_host, reference_image):
    before = pristine(sd1_host.unet)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Interrupted, match="step 3"):
        train_attribute(
            sd1_host,
            reference_image,
            AttributeConfig(steps=50, n_views=2),
            Callbacks(should_stop=stop),
        )
    assert same_weights(sd1_host.unet, before)
    assert all(not m._forward_hooks for m in sd1_host.unet.modules())


def test_progress_and_preview_callbacks(sd1_host, reference_image):
    seen, previews = [], []

    def preview(step):
        # offsets are live during a preview: the UNet output differs from the base
        previews.append(step)

    train_attribute(
        sd1_host,
        reference_image,
        AttributeConfig(steps=4, n_views=2, lr=1e-3, preview_every=2),
        Callbacks(progress=lambda s, n, loss: seen.append((s, n, loss)), preview=preview),
    )
    assert [s for s, _, _ in seen] == [1, 2, 3, 4] and all(n == 4 for _, n, _ in seen)
    assert previews == [2, 4]


def test_v_prediction_target(sd1_host, reference_image, monkeypatch):
    monkeypatch.setattr(sd1_host, "prediction_type", "v_prediction")
    result = train_attribute(
        sd1_host, reference_image, AttributeConfig(steps=10, n_views=2, lr=1e-3)
    )
    assert result.probe_loss_after < result.probe_loss_before


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"attribute": "colour"}, "attribute"),
        ({"rank": 0}, "rank"),
        ({"rank": -1}, "rank"),
        ({"steps": 0}, "steps"),
        ({"lr": 5.0}, "learning rate"),
        ({"token": "two words"}, "token"),
        ({"token": "<lora:x>"}, "token"),
        ({"prompt": "no placeholder"}, "token"),
        ({"default_lambda": "abc"}, "λ"),
        ({"network": "mlp"}, "network"),
        ({"timestep_range": (0.5, 0.2)}, "timestep"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
        ({"caption_dropout": -0.1}, "caption_dropout"),
    ],
)
def test_bad_config(changes, match):
    with pytest.raises(InputError, match=match):
        AttributeConfig(**changes)


def test_timesteps_default_by_attribute_and_recorded(trained, tmp_path):
    assert AttributeConfig(attribute="shape").timesteps == (0.0, 1.0)
    assert AttributeConfig(attribute="appearance").timesteps == (0.0, 0.5)
    assert AttributeConfig(attribute="style", timestep_range=(0.2, 0.9)).timesteps == (0.2, 0.9)
    result, _ = trained
    path = export(result, tmp_path, "ts")
    training = json.loads(load_adapter(path).metadata["ostaf.training"])
    assert training["timestep_range"] == [0.0, 0.5]  # appearance's default, resolved


def test_user_mask_of_another_size_and_photo_not_at_model_size(sd1_host):
    """A 300×200 photo with a 150×100 mask: the views keep the masked object's colours."""
    from PIL import Image

    photo = Image.new("RGB", (300, 200), (240, 240, 240))
    photo.paste((200, 30, 30), (120, 60, 200, 140))
    photo.paste((30, 30, 200), (10, 10, 40, 40))  # a second object the mask leaves out
    mask = Image.new("L", (150, 100), 0)
    mask.paste(255, (60, 30, 100, 70))
    cfg = AttributeConfig(attribute="appearance", steps=2, n_views=3)
    result = train_attribute(sd1_host, photo, cfg, mask=mask)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    with pytest.raises(InputError, match="empty"):
        train_attribute(sd1_host, photo, cfg, mask=Image.new("L", (150, 100), 0))


def test_bad_image(sd1_host, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="cannot read"):
        train_attribute(sd1_host, bad, AttributeConfig(steps=1))


def test_non_finite_steps_are_skipped_then_training_stops():
    from lib_ostaf.method.train import Callbacks, run_steps

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    bad = {1, 3}

    def step_loss(step):
        scale = float("inf") if step in bad else 1.0
        return (w * scale).square().sum()

    before = []

    def progress(step, total, loss):
        before.append(w.detach().clone())

    losses = run_steps(5, step_loss, opt, Callbacks(progress=progress))
    assert len(losses) == 5 and torch.isfinite(w).all()
    assert torch.equal(before[1], before[0]) and torch.equal(before[3], before[2])  # skipped
    assert not torch.equal(before[2], before[1])  # a finite step moves the weights
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        run_steps(10, lambda step: (w * float("nan")).sum(), opt, Callbacks())
    assert torch.isfinite(w).all()


def test_webui_tokens_scale_with_each_adapters_lambda(sd1_host, tmp_path):
    """The WebUI appliers' token list: a learned placeholder at the adapter's λ."""
    from lib_ostaf.hosts.webui_common import wanted_tokens
    from lib_ostaf.method.embeddings import adapter_embeddings
    from lib_ostaf.webui.activation import PlannedAdapter

    cfg = AttributeConfig(attribute="appearance", steps=2, n_views=1, token_lr=0.05)
    result = train_attribute(sd1_host, DEMO_IMAGE, cfg)
    adapter = load_adapter(export(result, tmp_path, "a"))
    (v,) = adapter_embeddings(adapter, "sd1")["ostafv"]
    (v0,) = result.token_init["ostafv"]
    for lam, t in ((0.0, 0.0), (0.5, 0.5), (2.0, 1.0)):
        planned = PlannedAdapter("a", adapter, lam, short_hash="")
        wanted, messages = wanted_tokens([planned], "sd1", lambda: sd1_host.text_encoders)
        assert messages == []
        torch.testing.assert_close(wanted["ostafv"][1][0], v0 + t * (v - v0))
    unscaled, _ = wanted_tokens([planned], "sd1")  # no encoders: the file's vector
    torch.testing.assert_close(unscaled["ostafv"][1][0], v)


def test_a_model_already_non_finite_is_named_before_any_step(sd1_host, monkeypatch):
    """A checkpoint/VAE that overflows on this reference is reported as such before any
    training step, not as "training diverged; lower the learning rate"."""
    predict = sd1_host.predict_noise

    def overflowing(x_t, t, cond):  # the model's own output is inf at higher noise
        out = predict(x_t, t, cond)
        return torch.where(t.view(-1, 1, 1, 1) > 100, torch.full_like(out, math.inf), out)

    monkeypatch.setattr(sd1_host, "predict_noise", overflowing)
    unet = pristine(sd1_host.unet)
    steps: list[int] = []
    callbacks = Callbacks(progress=lambda step, total, loss: steps.append(step))
    with pytest.raises(ModelNotFinite, match="before any training"):
        train_attribute(sd1_host, DEMO_IMAGE, AttributeConfig(steps=3, n_views=2), callbacks)
    assert steps == []  # not one step was spent
    assert same_weights(sd1_host.unet, unet)


def test_a_non_finite_text_encoding_names_the_text_side(sd1_host, monkeypatch):
    """Seen on Forge Neo with a random checkpoint: A1111's "Original" emphasis divides the
    conditioning by its mean, which an untrained final LayerNorm puts at ~0, so a learned
    token could turn the prompt's conditioning into NaN. The error says so, and does not
    send the user to the UNet's learning rate."""
    encode = sd1_host.encode_prompt
    seen: list[torch.Tensor] = []

    def nan(cond):
        if isinstance(cond, dict):
            return {k: v * math.nan for k, v in cond.items()}
        return cond * math.nan

    def encode_nan_once_moved(prompt, embeddings=None):
        cond = encode(prompt, embeddings)
        if embeddings:
            vector = next(iter(embeddings.values()))[0].detach().clone()
            seen.append(vector)
            if not torch.equal(vector, seen[0]):  # the token has moved: NaN
                cond = nan(cond)
        return cond

    monkeypatch.setattr(sd1_host, "encode_prompt", encode_nan_once_moved)
    unet = pristine(sd1_host.unet)
    config = AttributeConfig(steps=2, n_views=2)
    assert config.token_lr_ > 0
    with pytest.raises(TrainingDiverged, match=r"text encoder's output .* learned token"):
        train_attribute(sd1_host, DEMO_IMAGE, config)
    assert same_weights(sd1_host.unet, unet)
    # NaN from the start: named before any step, as the text encoder's
    monkeypatch.setattr(sd1_host, "encode_prompt", lambda p, e=None: nan(encode(p, e)))
    steps: list[int] = []
    callbacks = Callbacks(progress=lambda step, total, loss: steps.append(step))
    with pytest.raises(ModelNotFinite, match="text encoder's output for the training prompt"):
        train_attribute(sd1_host, DEMO_IMAGE, config, callbacks)
    assert steps == []


def test_an_object_model_already_non_finite_is_named_before_any_step(sd1_host, monkeypatch):
    from lib_ostaf.method.objects import ObjectConfig, ObjectSpec, train_objects

    predict = sd1_host.predict_noise
    monkeypatch.setattr(
        sd1_host, "predict_noise", lambda x_t, t, cond: predict(x_t, t, cond) * math.nan
    )
    image = Image.open(DEMO_IMAGE).convert("RGB")
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (image.width // 4, image.height // 4, image.width // 2, image.height // 2))
    config = ObjectConfig(steps=2, embedding_steps=1)
    with pytest.raises(ModelNotFinite):
        train_objects(sd1_host, image, [ObjectSpec("mug1", "mug", mask)], config)
