"""Object implantation on the tiny models: every loss term with a number, two objects from
one image, the files, diffusers interop, the CLI and bad input."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lib_ostaf.cli import main
from lib_ostaf.errors import InputError, Interrupted
from lib_ostaf.files.adapter_file import load_adapter, load_state
from lib_ostaf.method.embeddings import adapter_embeddings, load_embedding
from lib_ostaf.method.hypernet import DirectLoRA, HypernetConfig, LayerShape
from lib_ostaf.method.images import square
from lib_ostaf.method.masks import square_mask
from lib_ostaf.method.objects import (
    FALLBACK,
    PROTOTYPE,
    ClipTower,
    ObjectConfig,
    ObjectSpec,
    anchor_loss,
    class_regularization,
    class_word_vectors,
    export_objects,
    masked_object,
    object_loss,
    objects_from_lists,
    prototype_target,
    prototypical_embedding,
    relative_distance,
    train_objects,
)
from lib_ostaf.method.offsets import OffsetHooks
from lib_ostaf.method.targets import TargetSpec, find_module, select_targets
from lib_ostaf.method.train import Callbacks
from lib_ostaf.world import tiny

from .conftest import pristine, same_weights
from .test_embeddings import cond_equal, fresh_text_pipeline
from .test_masks import scene

TOKENS, CLASSES = ["<obj1>", "<obj2>"], ["ball", "box"]
FAST = dict(
    steps=8,
    embedding_steps=2,
    lr=3e-3,
    embedding_lr=1e-2,
    prototype_steps=15,
    n_probe=2,
    anchor_weight=0.01,
)


@pytest.fixture(scope="module")
def two_objects():
    """A red disc (left) and a blue box (right) on a plain background, with true masks."""
    image, truth = scene(
        [
            ("ellipse", (8, 36, 58, 86), (200, 40, 40)),
            ("rectangle", (72, 34, 120, 92), (40, 70, 200)),
        ],
        size=(128, 128),
    )
    masks = [Image.fromarray(m.astype(np.uint8) * 255) for m in truth]
    return image, masks, truth


@pytest.fixture(scope="module")
def trained(sd1_host, two_objects):
    image, masks, _ = two_objects
    unet, te = pristine(sd1_host.unet), pristine(sd1_host.pipe.text_encoder)
    tower = tiny.clip_tower(sd1_host.pipe.text_encoder)
    objects = [ObjectSpec(t, c, m) for t, c, m in zip(TOKENS, CLASSES, masks, strict=True)]
    result = train_objects(sd1_host, image, objects, ObjectConfig(**FAST), tower=tower)
    return result, unet, te


# --------------------------------------------------------------------------- loss terms


def test_object_loss_ignores_everything_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    w = torch.zeros(1, 1, 8, 8)
    w[..., 2:5, 3:6] = 1.0
    loss = object_loss(pred, target, w)
    expected = (pred - target)[..., 2:5, 3:6].pow(2).mean()
    assert abs(float(loss) - float(expected)) < 1e-6
    # change prediction and target outside the mask, even to NaN/∞: the loss is unchanged
    outside = (w == 0).expand_as(pred)
    pred2, target2 = pred.clone(), target.clone()
    pred2[outside] = float("nan")
    target2[outside] = 1e6
    assert float(object_loss(pred2, target2, w)) == float(loss)
    # the background weight brings the outside back in, as a weighted mean
    full = (pred - target).pow(2)
    w_bg = w + 0.25 * (1 - w)
    manual = (full * w_bg).sum() / (w_bg.sum() * 4)
    assert abs(float(object_loss(pred, target, w_bg)) - float(manual)) < 1e-6
    with pytest.raises(InputError, match="empty"):
        object_loss(pred, target, torch.zeros(1, 1, 8, 8))


def _lora_on_decoder(host, rank=2):
    targets = select_targets(host.unet, TargetSpec(attribute="appearance"))
    modules = {t.kohya: find_module(host.unet, t.name) for t in targets}
    layers = [
        LayerShape(t.kohya, f"{t.attn}.{t.proj}", t.in_features, t.out_features) for t in targets
    ]
    torch.manual_seed(0)
    return DirectLoRA(layers, HypernetConfig(rank=rank)), modules


def test_class_regularization_is_zero_for_a_zero_adapter(sd1_host):
    network, modules = _lora_on_decoder(sd1_host)
    class_vec = class_word_vectors(sd1_host, "ball")
    cond = sd1_host.encode_prompt("a photo of a ball")
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    with OffsetHooks(modules) as hooks:
        hooks.factors = network()  # DirectLoRA starts with B = 0: ΔW = 0
        prior, anchor = class_regularization(
            sd1_host, hooks, x_t, t, cond, class_vec, class_vec, anchor_weight=1.0
        )
        assert float(prior.detach()) == 0.0 and float(anchor) == 0.0
        with torch.no_grad():
            for up in network.up:
                up.normal_(0, 0.05)
        hooks.factors = network()
        moved = [class_vec[0] + 0.1]
        prior, anchor = class_regularization(
            sd1_host, hooks, x_t, t, cond, moved, class_vec, anchor_weight=1.0
        )
    assert float(prior.detach()) > 1e-6
    expected = 0.1**2 * class_vec[0].numel() / float(class_vec[0].pow(2).sum())
    assert abs(float(anchor) - expected) < 1e-4 * expected
    assert float(anchor_loss(class_vec, class_vec)) == 0.0
    # with a margin (the prototype's own distance): 0 at the start and closer, > 0 beyond
    start = [class_vec[0] + 0.1]
    margin = [float(relative_distance(start[0], class_vec[0]))]
    assert float(anchor_loss(start, class_vec, margin)) == 0.0
    assert float(anchor_loss([class_vec[0] + 0.05], class_vec, margin)) == 0.0
    farther = float(anchor_loss([class_vec[0] + 0.2], class_vec, margin))
    assert abs(farther - 3 * expected) < 1e-3 * expected  # (0.2² − 0.1²)·D/‖c‖²


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prototype_is_closer_than_the_class_word(family, sd1_host, sdxl_host, two_objects):
    host = sd1_host if family == "sd1" else sdxl_host
    image, _, truth = two_objects
    index = 0 if family == "sd1" else 1  # SD1: CLIPModel ↔ CLIP-L; SDXL: vision tower ↔ CLIP-G
    tower = ClipTower(tiny.clip_tower(host.text_encoders[index].model))
    assert tower.match(host.text_encoders) == index
    encoder = host.text_encoders[index]
    target = prototype_target(tower, encoder, image, truth[0], "a photo of a ball")
    assert abs(float(target.norm()) - 1.0) < 1e-5
    init = encoder.word_vectors("ball").mean(0, keepdim=True)
    row, cos_word, cos_proto = prototypical_embedding(
        tower, encoder, target, "<obj1>", init, "a photo of a <obj1>", steps=15, lr=1e-2
    )

    # recomputed independently: the prototype row is closer (cosine) than the class word
    def cos(vec):
        with torch.no_grad():
            f = tower.text_feature(encoder, "a photo of a <obj1>", {"<obj1>": vec})
        return float(torch.nn.functional.cosine_similarity(f, target, dim=0))

    assert abs(cos(init) - cos_word) < 1e-5 and abs(cos(row) - cos_proto) < 1e-5
    assert cos_proto > cos_word + 0.1, (cos_word, cos_proto)
    assert abs(float(row.norm()) - float(init.norm())) < 1e-4  # the class word's norm kept


def test_tower_from_a_folder_and_mismatch(sd1_host, tmp_path):
    model = tiny.clip_tower(sd1_host.pipe.text_encoder)
    model.save_pretrained(tmp_path / "clip")
    tower = ClipTower.load(tmp_path / "clip")
    image = Image.new("RGB", (80, 60), (10, 200, 30))
    features = ClipTower(model).image_features([image])
    assert torch.allclose(tower.image_features([image]), features, atol=1e-5)
    # a vision-only tower cannot pair with SD1's projection-less text encoder
    vision = tiny.clip_tower(tiny.components("sdxl")["text_encoder_2"])
    reason = ClipTower(vision).match(sd1_host.text_encoders)
    assert isinstance(reason, str) and "full CLIPModel" in reason
    with pytest.raises(InputError, match="CLIP"):
        ClipTower.load(tmp_path / "nothing")


# --------------------------------------------------------------------------- two objects


def test_two_objects_train_and_leave_the_model_as_found(sd1_host, trained):
    result, unet, te = trained
    assert result.tokens == TOKENS and result.classes == CLASSES
    assert [p.method for p in result.prototypes] == [PROTOTYPE, PROTOTYPE]
    for p in result.prototypes:
        assert p.cos_prototype > p.cos_class_word + 0.1, p
    # each token alone and both together: the object loss on fixed draws fell
    assert set(result.probe) == {
        "a photo of <obj1>",
        "a photo of <obj2>",
        "a photo of <obj1> and <obj2>",
    }
    for label, (before, after) in result.probe.items():
        assert after < before, (label, before, after)
    assert len(result.losses) == 10 and all(np.isfinite(result.losses))
    assert max(result.terms["prior"]) > 0 and result.terms["prior"][:2] == [0.0, 0.0]
    assert result.terms["anchor"][0] == 0.0  # the anchor starts at the prototype's distance
    # embeddings trained: moved away from their initialisation
    for t in TOKENS:
        assert not torch.equal(result.embeddings[t][0], result.initial_embeddings[t][0])
    assert same_weights(sd1_host.unet, unet) and same_weights(sd1_host.pipe.text_encoder, te)
    assert not any(p.requires_grad for p in sd1_host.unet.parameters())
    assert all(not m._forward_hooks for m in sd1_host.unet.modules())


def test_files_tokens_classes_and_bundle(trained, tmp_path):
    result, _, _ = trained
    files = export_objects(result, tmp_path, "pair", bundle=True, save_state=True)
    adapter = load_adapter(files.lora)
    assert adapter.embeddings == {}  # the plain file is pure kohya
    assert set(adapter.modules) == {t.kohya for t in result.targets}
    md = adapter.metadata
    assert md["ostaf.method"] == "object" and md["ostaf.prototype"] == PROTOTYPE
    assert json.loads(md["ostaf.tokens"]) == TOKENS and json.loads(md["ostaf.classes"]) == CLASSES
    assert json.loads(md["ostaf.embeddings"]) == {
        "<obj1>": "pair.embeddings/obj1.safetensors",
        "<obj2>": "pair.embeddings/obj2.safetensors",
    }
    assert md["modelspec.trigger_phrase"] == "<obj1>, <obj2>"
    card = json.loads(files.card.read_text())
    assert all(t in card["activation text"] for t in TOKENS)
    for key, (a, b) in result.factors().items():
        torch.testing.assert_close(adapter.modules[key].delta(), b @ a, rtol=0, atol=0)
    # portable files, one per token
    for t in TOKENS:
        token, vectors = load_embedding(files.embeddings[t], "sd1")
        assert token == t and torch.equal(vectors[0], result.embeddings[t][0])
        assert set(load_file(files.embeddings[t])) == {"emb_params"}
    # the A1111 bundle: same LoRA + bundle_emb.<token>.emb_params
    bundled = load_adapter(files.bundle)
    assert set(bundled.embeddings) == set(TOKENS)
    assert set(bundled.modules) == set(adapter.modules)
    # its ModelSpec hash is 0x + the SHA-256 of the tensor bytes (header excluded)
    raw = files.bundle.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    digest = hashlib.sha256(raw[header:]).hexdigest()
    assert bundled.metadata["modelspec.hash_sha256"] == "0x" + digest
    assert bundled.metadata["sshs_model_hash"] == digest
    assert "<obj1>" in json.loads((tmp_path / "pair.a1111.json").read_text())["activation text"]
    # the object adapter finds its embeddings in both forms
    for source in (adapter, bundled):
        found = adapter_embeddings(source)
        assert all(torch.equal(found[t][0], result.embeddings[t][0]) for t in TOKENS)
    tensors, config = load_state(files.state)
    assert config["tokens"] == TOKENS and "embedding.<obj1>.emb_params" in tensors
    # the sidecar is opt-in: overwriting without it removes the old one
    plain = export_objects(result, tmp_path, "pair", bundle=True, overwrite=True)
    assert plain.state is None and not files.state.exists()
    assert files.state not in plain.all() and plain.lora.exists()
    # nothing is overwritten: one existing target refuses the whole export
    files.embeddings["<obj2>"].write_bytes(b"keep me")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="already exist"):
        export_objects(result, tmp_path, "pair")
    with pytest.raises(InputError, match="already exist"):
        export_objects(result, tmp_path, "other", embeddings_dir=files.embeddings["<obj2>"].parent)
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def test_portable_embedding_loads_in_diffusers_like_ours(sd1_host, trained, tmp_path):
    """pipe.load_textual_inversion(state_dict["emb_params"], token=...) + the plain LoRA in
    diffusers' own loader: the text-encoder output equals our splicing path."""
    result, _, _ = trained
    files = export_objects(result, tmp_path, "pair")
    pipe = fresh_text_pipeline(sd1_host)
    for t in TOKENS:
        state = load_file(files.embeddings[t])
        pipe.load_textual_inversion(
            state["emb_params"], token=t, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
    ours = adapter_embeddings(load_adapter(files.lora))
    for prompt in [
        "a photo of <obj1>",
        "a photo of <obj2> on grass",
        "a photo of <obj1> and <obj2>",
    ]:
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        mine = sd1_host.encode_prompt(prompt, ours)
        assert cond_equal(mine, {"encoder_hidden_states": theirs}, exact=False)
    # the plain LoRA file loads in diffusers' kohya loader without complaint
    import copy

    from diffusers import StableDiffusionPipeline

    lora_pipe = StableDiffusionPipeline(
        **{k: v for k, v in pipe.components.items() if k != "unet"},
        unet=copy.deepcopy(sd1_host.unet),
    )
    lora_pipe.load_lora_weights(str(files.lora))
    assert lora_pipe.get_active_adapters()


def test_each_token_alone_and_together_generates(sd1_host, trained, tmp_path):
    result, unet, _ = trained
    files = export_objects(result, tmp_path, "pair")
    adapter = load_adapter(files.lora)
    emb = adapter_embeddings(adapter)
    sd1_host.apply_adapters([(adapter, 1.0)])
    try:
        images = {
            p: np.asarray(sd1_host.generate(p, seed=1, steps=2, embeddings=emb), dtype=np.float32)
            for p in ["a photo of <obj1>", "a photo of <obj2>", "a photo of <obj1> and <obj2>"]
        }
    finally:
        sd1_host.apply_adapters([])
    assert same_weights(sd1_host.unet, unet)
    a, b, both = images.values()
    diffs = [float(np.abs(x - y).mean()) for x, y in ((a, b), (a, both), (b, both))]
    print("mean |Δ| between the three images (8-bit levels):", diffs)
    assert min(diffs) > 1.0, diffs  # measured 2.2–3.2


# --------------------------------------------------------------------------- runs


def test_fallback_is_logged_recorded_and_deterministic(sd1_host, two_objects, tmp_path, caplog):
    image, masks, _ = two_objects
    config = ObjectConfig(
        steps=2, embedding_steps=1, lr=1e-3, embedding_lr=1e-2, n_probe=1, clip="none"
    )
    objects = [ObjectSpec("<obj1>", "ball", masks[0])]
    with caplog.at_level(logging.WARNING):
        first = train_objects(sd1_host, image, objects, config)
    assert FALLBACK in caplog.text
    assert first.prototypes[0].method == FALLBACK
    # the class word is the starting point
    assert torch.equal(
        first.initial_embeddings["<obj1>"][0], class_word_vectors(sd1_host, "ball")[0]
    )
    second = train_objects(sd1_host, image, objects, config)
    assert first.losses == second.losses and len(first.losses) == 3
    assert torch.equal(first.embeddings["<obj1>"][0], second.embeddings["<obj1>"][0])
    for key, (a, b) in first.factors().items():
        a2, b2 = second.factors()[key]
        assert torch.equal(a, a2) and torch.equal(b, b2)
    files = export_objects(first, tmp_path, "one")
    assert load_adapter(files.lora).metadata["ostaf.prototype"] == FALLBACK


def test_sdxl_object_file_and_diffusers(sdxl_host, two_objects, tmp_path):
    image, masks, _ = two_objects
    config = ObjectConfig(steps=1, embedding_steps=0, lr=1e-3, n_probe=1, prototype_steps=3)
    tower = tiny.clip_tower(sdxl_host.pipe.text_encoder_2)
    result = train_objects(
        sdxl_host, image, [ObjectSpec("<obj2>", "box", masks[1])], config, tower=tower
    )
    assert result.prototypes[0].encoder == "clip_g"
    files = export_objects(result, tmp_path, "xl", bundle=True)
    state = load_file(files.embeddings["<obj2>"])
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (1, 64), "clip_g": (1, 32)}
    assert set(load_adapter(files.bundle).embeddings["<obj2>"]) == {"clip_l", "clip_g"}
    pipe = fresh_text_pipeline(sdxl_host)
    pipe.load_textual_inversion(
        state["clip_l"], token="<obj2>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"],
        token="<obj2>",
        text_encoder=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer_2,
    )
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a photo of <obj2>", do_classifier_free_guidance=False
    )
    mine = sdxl_host.encode_prompt(
        "a photo of <obj2>", adapter_embeddings(load_adapter(files.lora))
    )
    theirs = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled}}
    assert cond_equal(mine, theirs, exact=False)


def test_interrupt_restores_and_progress_counts_both_phases(sd1_host, two_objects):
    image, masks, _ = two_objects
    before = pristine(sd1_host.unet)
    seen = []
    config = ObjectConfig(steps=3, embedding_steps=2, lr=1e-3, n_probe=1, clip="none")
    with pytest.raises(Interrupted, match="step 3/5"):
        train_objects(
            sd1_host,
            image,
            [ObjectSpec("<obj1>", "ball", masks[0])],
            config,
            Callbacks(
                progress=lambda s, n, loss: seen.append((s, n)), should_stop=lambda: len(seen) >= 3
            ),
        )
    assert seen == [(1, 5), (2, 5), (3, 5)]
    assert same_weights(sd1_host.unet, before)
    assert all(not m._forward_hooks for m in sd1_host.unet.modules())


# --------------------------------------------------------------------------- CLI


def test_cli_implant_with_auto_masks_then_generate(two_objects, tmp_path, capsys):
    image, _, truth = two_objects
    image.save(tmp_path / "photo.png")
    out = tmp_path / "out"
    args = ["implant", "--image", str(tmp_path / "photo.png"), "--name", "pair", "--out", str(out)]
    args += ["--token", "<obj1>", "--class", "ball", "--token", "<obj2>", "--class", "box"]
    args += ["--steps", "1", "--embedding-steps", "0", "--probe", "1", "--clip", "none"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "initialised from its class word" in text and "object loss" in text
    for t, m in zip(("obj1", "obj2"), truth, strict=True):
        auto = np.asarray(Image.open(out / f"pair.mask-{t}.png")) > 127
        assert (auto & m).sum() / (auto | m).sum() >= 0.9  # saved beside the output, IoU ≥ 0.9
    assert (out / "pair.embeddings" / "obj1.safetensors").is_file()
    # a second run with the same name is refused before any training
    assert main(args) == 2
    assert "already exist" in capsys.readouterr().err
    png = tmp_path / "gen.png"
    # the adapter brings its tokens; a loose embedding file (renamed token) works too
    loose = f"{out / 'pair.embeddings' / 'obj1.safetensors'}:<x9>"
    gen = ["generate", "--prompt", "a photo of <obj1> and <obj2> and <x9>", "--adapter", "pair"]
    gen += ["--adapters-dir", str(out), "--embedding", loose]
    gen += ["--steps", "1", "--output", str(png)]
    assert main(gen) == 0
    assert "tokens: <obj1>, <obj2>, <x9>" in capsys.readouterr().out
    assert Image.open(png).size == (128, 128)


# --------------------------------------------------------------------------- real photos

SIDE_DISC = {(200, 150): (110, 30, 180, 110), (3000, 40): (1800, 4, 2400, 36)}
PHOTO = dict(steps=1, embedding_steps=1, lr=1e-3, n_probe=1, prototype_steps=3, clip="none")


def _red_share(image: Image.Image, mask: np.ndarray) -> float:
    """Share of red pixels among the non-white ones of the masked object's crop."""
    a = np.asarray(masked_object(image, mask)).astype(int)
    painted = a.sum(-1) < 3 * 250
    red = (a[..., 0] > 150) & (a[..., 1] < 110) & (a[..., 2] < 110)
    return float((red & painted).sum() / max(1, painted.sum()))


@pytest.mark.parametrize(
    "size,with_tower",
    [((200, 150), True), ((200, 150), False), ((3000, 40), True)],
    ids=["200x150-clip", "200x150-no-clip", "3000x40-clip"],
)
def test_photo_of_another_size_than_the_model(sd1_host, size, with_tower):
    """The model is 128²: the photo is padded and resized, its mask with it."""
    image, truth = scene([("ellipse", SIDE_DISC[size], (200, 40, 40))], size=size)
    tower = tiny.clip_tower(sd1_host.pipe.text_encoder) if with_tower else None
    result = train_objects(
        sd1_host, image, [ObjectSpec("<o1>", "ball", truth[0])], ObjectConfig(**PHOTO), tower=tower
    )
    p = result.prototypes[0]
    assert p.method == (PROTOTYPE if with_tower else FALLBACK)
    if with_tower:
        assert p.cos_prototype > p.cos_class_word, p
    assert np.array_equal(result.masks[0], truth[0])  # kept at the photo's own size
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    # the object the prototype sees is the red disc, not a shifted patch of background
    share = _red_share(square(image, 128), square_mask(truth[0], 128))
    assert share > (0.9 if size == (200, 150) else 0.6), share


def test_mask_of_another_size_than_its_photo(sd1_host, caplog):
    image, truth = scene([("ellipse", SIDE_DISC[(200, 150)], (200, 40, 40))], size=(200, 150))
    big = Image.fromarray(truth[0].astype(np.uint8) * 255).resize((400, 300), Image.NEAREST)
    tower = tiny.clip_tower(sd1_host.pipe.text_encoder)
    with caplog.at_level(logging.WARNING):
        result = train_objects(
            sd1_host, image, [ObjectSpec("<o1>", "ball", big)], ObjectConfig(**PHOTO), tower=tower
        )
    assert "is 400×300 but the image is 200×150" in caplog.text
    assert result.prototypes[0].method == PROTOTYPE
    m = result.masks[0]
    assert m.shape == (150, 200) and (m & truth[0]).sum() / (m | truth[0]).sum() > 0.97
    # masked_object resizes a mask of another size itself (here the 200×150 one to 128²)
    assert _red_share(image.resize((128, 96)), truth[0]) > 0.9


def test_cli_implants_a_rotated_jpeg_with_a_clip_folder(sd1_host, tmp_path, capsys):
    """A 200×150 photo stored on its side with an EXIF orientation, mask in display order."""
    image, truth = scene([("ellipse", SIDE_DISC[(200, 150)], (200, 40, 40))], size=(200, 150))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    Image.fromarray(truth[0].astype(np.uint8) * 255).save(tmp_path / "mask.png")
    # the tower's text tower must be the CLI's model's (tiny-world), not another CLIP's
    world = tiny.components("sd1", world=True)["text_encoder"]
    tiny.clip_tower(world).save_pretrained(tmp_path / "clip")
    args = ["implant", "--image", str(tmp_path / "photo.jpg"), "--mask", str(tmp_path / "mask.png")]
    args += ["--token", "<o1>", "--class", "ball", "--clip", str(tmp_path / "clip")]
    args += ["--name", "rot", "--out", str(tmp_path / "out"), "--steps", "1"]
    args += ["--embedding-steps", "0", "--probe", "1", "--prototype-steps", "2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "<o1>: prototypical embedding (clip_l)" in captured.out
    assert "resized" not in captured.err  # the mask matched the turned photo as is
    assert (tmp_path / "out" / "rot.safetensors").is_file()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "tokens,classes,masks,match",
    [
        (["<a1>"], ["mug"], ["m1.png", "m2.png"], "2 masks for 1 token"),
        (["<a1>", "<b1>"], ["mug"], [], "2 token.*1 class"),
        (["<a1>", "<b1>"], ["mug", "cup"], ["m1.png"], "every object"),
        ([], [], [], "at least one"),
    ],
)
def test_bad_object_lists(tokens, classes, masks, match):
    with pytest.raises(InputError, match=match):
        objects_from_lists(tokens, classes, masks)


@pytest.mark.parametrize(
    "objects,match",
    [
        ([("<a1>", "ball"), ("<a1>", "box")], "duplicate token"),
        ([("<a1>", "ball"), ("<A1>", "box")], "duplicate token"),
        ([("mug", "cup")], "already exists in the tokenizer"),
        ([("<a1>", "  ")], "class name of '<a1>' is empty"),
        ([("two words", "ball")], "token"),
    ],
)
def test_bad_objects_fail_before_any_work(sd1_host, two_objects, objects, match):
    image, masks, _ = two_objects
    specs = [ObjectSpec(t, c, masks[0]) for t, c in objects]
    with pytest.raises(InputError, match=match):
        train_objects(sd1_host, image, specs, ObjectConfig(steps=1, clip="none"))


@pytest.mark.parametrize(
    "mask,match",
    [
        (np.zeros((128, 128), bool), "mask of <a1> is empty"),
        (np.ones((128, 128), bool), "whole image"),
    ],
)
def test_bad_masks(sd1_host, two_objects, mask, match):
    image, _, _ = two_objects
    with pytest.raises(InputError, match=match):
        train_objects(sd1_host, image, [ObjectSpec("<a1>", "ball", mask)], ObjectConfig(steps=1))


def test_cli_bad_input_writes_nothing(two_objects, tmp_path, capsys):
    image, masks, _ = two_objects
    image.save(tmp_path / "photo.png")
    masks[0].save(tmp_path / "m1.png")
    base = [
        "implant",
        "--image",
        str(tmp_path / "photo.png"),
        "--name",
        "x",
        "--out",
        str(tmp_path / "o"),
    ]
    cases = [
        (["--token", "<a1>", "--class", "ball", "--mask", str(tmp_path / "m1.png")] * 1
         + ["--mask", str(tmp_path / "m1.png")], "masks for 1 token"),
        (["--token", "cat", "--class", "ball"], "already exists"),
        (["--token", "<a1>", "--class", ""], "empty"),
    ]  # fmt: skip
    for extra, match in cases:
        assert main(base + extra + ["--steps", "1", "--clip", "none"]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"steps": 0}, "steps"),
        ({"embedding_steps": -1}, "embedding_steps"),
        ({"lr": 0}, "lr"),
        ({"embedding_lr": 2.0}, "embedding_lr"),
        ({"class_weight": -1.0}, "class_weight"),
        ({"background_weight": 1.5}, "background_weight"),
        ({"prompt": "a photo"}, "tokens"),
        ({"class_prompt": "a photo"}, "class"),
        ({"parts": ("top",)}, "parts"),
        ({"network": "mlp"}, "network"),
    ],
)
def test_bad_config(changes, match):
    with pytest.raises(InputError, match=match):
        ObjectConfig(**changes)
