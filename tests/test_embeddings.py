"""Token embeddings: splicing equals the pipelines' own path, files, diffusers' loader."""

from __future__ import annotations

import copy

import pytest
import torch

from lib_ostaf.errors import AdapterFileError, IncompatibleModelError, InputError
from lib_ostaf.method.embeddings import (
    bundle_state_dict,
    check_new_tokens,
    embedding_state_dict,
    file_stem,
    load_embedding,
    portable_keys,
    save_embedding,
    validate_token,
    vectors_from_state,
)
from lib_ostaf.world import tiny

from .conftest import pristine, same_weights
from .webui_fakes import rank2_metadata


@pytest.fixture(params=["sd1", "sdxl"])
def host(request, sd1_host, sdxl_host):
    return sd1_host if request.param == "sd1" else sdxl_host


def random_embedding(host, seed=0, n=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, enc.width, generator=g) * 0.1 for enc in host.text_encoders)


def fresh_text_pipeline(host):
    """A pipeline sharing the host's UNet/VAE but with its own tokenizer(s)/text encoder(s)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    p = host.pipe
    parts = dict(unet=p.unet, vae=p.vae, scheduler=p.scheduler)
    parts |= dict(text_encoder=copy.deepcopy(p.text_encoder), tokenizer=tiny.tokenizer())
    if host.is_sdxl:
        parts |= dict(text_encoder_2=copy.deepcopy(p.text_encoder_2), tokenizer_2=tiny.tokenizer())
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def cond_equal(a, b, exact=True):
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, atol=1e-6, rtol=1e-5))
    same = check(a["encoder_hidden_states"], b["encoder_hidden_states"])
    if "added_cond_kwargs" in a:
        same = same and check(
            a["added_cond_kwargs"]["text_embeds"], b["added_cond_kwargs"]["text_embeds"]
        )
    return same


@pytest.mark.parametrize("token", ["mug1", "<mug1>", "<my_toy-2>", "A1"])
def test_valid_tokens(token):
    assert validate_token(token) == token
    assert file_stem("<mug1>") == "mug1"


@pytest.mark.parametrize("token", ["", " ", "two words", "<mug1", "mug1>", "a.b", "x:1", "<>"])
def test_invalid_tokens(token):
    with pytest.raises(InputError, match="token"):
        validate_token(token)


def test_new_tokens_must_be_distinct_and_new(sd1_host):
    encoders = sd1_host.text_encoders
    assert check_new_tokens(["<a1>", "<b1>"], encoders) == ["<a1>", "<b1>"]
    with pytest.raises(InputError, match="duplicate"):
        check_new_tokens(["<a1>", "<A1>"], encoders)
    with pytest.raises(InputError, match="duplicate"):
        check_new_tokens(["<a1>", "a1"], encoders)  # same file name
    for word in ("mug", "Cat"):  # whole words of the tiny vocabulary
        with pytest.raises(InputError, match="already exists in the tokenizer"):
            check_new_tokens([word], encoders)


def test_splicing_without_tokens_is_the_pipeline_path(host):
    emb = {"<zz9>": random_embedding(host)}
    for prompt in ["a photo of a mug", "a red cat and a blue dog on a table " * 8]:
        assert cond_equal(host.encode_prompt(prompt), host.encode_prompt(prompt, emb))


def test_spliced_vector_acts_as_that_word(host):
    """The row of 'mug' spliced in for <zz9> gives bit-for-bit the prompt with 'mug'."""
    mug = tuple(enc.word_vectors("mug") for enc in host.text_encoders)
    assert all(v.shape == (1, enc.width) for v, enc in zip(mug, host.text_encoders, strict=True))
    ours = host.encode_prompt("a photo of <zz9> on a table", {"<zz9>": mug})
    assert cond_equal(ours, host.encode_prompt("a photo of mug on a table"))
    # case-insensitive like CLIP, several occurrences, glued punctuation
    ours = host.encode_prompt("<ZZ9>, a <zz9>!", {"<zz9>": mug})
    assert cond_equal(ours, host.encode_prompt("mug, a mug!"))


def test_multi_vector_token_and_truncation(sd1_host):
    cat, dog = (sd1_host.text_encoders[0].word_vectors(w) for w in ("cat", "dog"))
    two = {"<pet>": (torch.cat([cat, dog]),)}
    assert cond_equal(
        sd1_host.encode_prompt("a <pet> here", two), sd1_host.encode_prompt("a cat dog here")
    )
    long = "red " * 80 + "<pet>"  # the token falls after the 75-token limit: dropped
    assert cond_equal(sd1_host.encode_prompt(long, two), sd1_host.encode_prompt("red " * 80))


def hook_counts(module):
    return [len(m._forward_hooks) for m in module.modules()]


def test_gradient_reaches_only_the_vectors(host):
    host.encode_prompt("warm up")  # transformers installs its own output-capturing hooks once
    before, hooks = pristine(host.pipe.text_encoder), hook_counts(host.pipe.text_encoder)
    vec = [v.clone().requires_grad_(True) for v in random_embedding(host)]
    cond = host.encode_prompt("a photo of <zz9>", {"<zz9>": vec})
    loss = cond["encoder_hidden_states"].pow(2).mean()
    if host.is_sdxl:
        loss = loss + cond["added_cond_kwargs"]["text_embeds"].pow(2).mean()
    loss.backward()
    assert all(v.grad is not None and float(v.grad.abs().sum()) > 0 for v in vec)
    assert all(p.grad is None for p in host.pipe.text_encoder.parameters())
    assert same_weights(host.pipe.text_encoder, before)
    assert hook_counts(host.pipe.text_encoder) == hooks  # our splice hook is gone


def test_wrong_width_is_refused(host):
    bad = {"<zz9>": tuple(torch.zeros(1, enc.width + 1) for enc in host.text_encoders)}
    with pytest.raises(IncompatibleModelError, match="needs"):
        host.encode_prompt("a <zz9>", bad)


def load_into_pipeline(pipe, embeddings, family):
    """How a diffusers user loads our files: the tokens registered with the pipeline's own
    ``load_textual_inversion`` (tokenizer(s) and text encoder(s)); returns an undo."""
    keys = portable_keys(family)
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if family == "sdxl":
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    for token, vectors in embeddings.items():
        state = embedding_state_dict(vectors, family)
        for key, (tokenizer, encoder) in zip(keys, pairs, strict=True):
            pipe.load_textual_inversion(
                state[key], token=token, text_encoder=encoder, tokenizer=tokenizer
            )

    def undo() -> None:
        for tokenizer, encoder in pairs:
            pipe.unload_textual_inversion(
                list(embeddings), tokenizer=tokenizer, text_encoder=encoder
            )

    return undo


def test_diffusers_load_textual_inversion_gives_our_output(host):
    """diffusers' own loader (tokens added to the tokenizer) = our splicing, then undone."""
    emb = {"<aa1>": random_embedding(host, 1), "<bb2>": random_embedding(host, 2)}
    pipe = fresh_text_pipeline(host)
    n_vocab = len(pipe.tokenizer)
    undo = load_into_pipeline(pipe, emb, host.family)
    assert len(pipe.tokenizer) == n_vocab + 2
    for prompt in ["a photo of <aa1>", "a photo of <aa1> and <bb2>", "<bb2> on a table"]:
        if host.is_sdxl:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
            theirs = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled}}
        else:
            embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
            theirs = {"encoder_hidden_states": embeds}
        assert cond_equal(host.encode_prompt(prompt, emb), theirs, exact=False)
    undo()
    assert len(pipe.tokenizer) == n_vocab


def test_portable_file_round_trip_and_keys(host, tmp_path):
    vectors = random_embedding(host, 3)
    path = save_embedding(tmp_path / "obj1.safetensors", vectors, host.family)
    from safetensors.torch import load_file

    keys = set(load_file(path))
    assert keys == ({"clip_l", "clip_g"} if host.is_sdxl else {"emb_params"})
    token, loaded = load_embedding(path, host.family)
    assert token == "obj1"
    assert all(torch.equal(a, b) for a, b in zip(loaded, vectors, strict=True))
    with pytest.raises(InputError, match="already exists"):
        save_embedding(path, vectors, host.family)
    other = "sd1" if host.is_sdxl else "sdxl"
    with pytest.raises(IncompatibleModelError):
        load_embedding(path, other)


def test_embedding_dict_forms():
    t = torch.ones(1, 8)
    assert vectors_from_state({"string_to_param.*": t}, "sd1", "x")[0].shape == (1, 8)
    assert vectors_from_state({"clip_l": t, "clip_l_out": t}, None, "x")[0].shape == (1, 8)
    assert len(vectors_from_state({"clip_l": t, "clip_g": torch.ones(1, 4)}, None, "x")) == 2
    with pytest.raises(AdapterFileError, match="expected"):
        vectors_from_state({"a": t, "b": t}, "sd1", "x")
    with pytest.raises(AdapterFileError, match="clip_l"):
        vectors_from_state({"clip_g": t}, "sdxl", "x")


def test_pickle_embedding_refused(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(AdapterFileError, match="pickle"):
        load_embedding(tmp_path / "x.pt")


def test_bundle_keys():
    emb = {"<o1>": (torch.ones(1, 4), torch.ones(1, 2))}
    assert set(bundle_state_dict(emb, "sdxl")) == {
        "bundle_emb.<o1>.clip_l",
        "bundle_emb.<o1>.clip_g",
    }
    assert set(bundle_state_dict({"o2": (torch.ones(1, 4),)}, "sd1")) == {
        "bundle_emb.o2.emb_params"
    }


# --------------------------------------------------------------------------- adapter files


def write_object_adapter(
    folder, name="mug", tokens=("<mug1>",), family="sd1", *, embeddings_dir=None, width=8
):
    """A small object adapter as ``export_objects`` lays it out: the LoRA, its card, one
    portable embedding per token (listed in ``ostaf.embeddings`` relative to ``folder``)."""
    import os
    from pathlib import Path

    from lib_ostaf.files.adapter_file import LoraModule, save_adapter
    from lib_ostaf.files.sidecars import write_card

    folder = Path(folder)
    emb_dir = Path(embeddings_dir) if embeddings_dir else folder / f"{name}.embeddings"
    g = torch.Generator().manual_seed(0)
    listed = {}
    for token in tokens:
        path = emb_dir / f"{file_stem(token)}.safetensors"
        vectors = tuple(
            torch.randn(1, w, generator=g) for w in ([width, 12] if family == "sdxl" else [width])
        )
        save_embedding(path, vectors, family, metadata={"ostaf.token": token})
        listed[token] = os.path.relpath(path, folder).replace(os.sep, "/")
    key = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    modules = {key: LoraModule(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0)}
    trigger = ", ".join(tokens)
    md = rank2_metadata(
        name,
        family,
        "object",
        512,
        trigger_phrase=trigger,
        ostaf={
            "tokens": list(tokens),
            "embeddings": listed,
            "prompt": "a photo of {tokens}",
            "default_lambda": 1.0,
        },
    )
    path = save_adapter(folder / f"{name}.safetensors", modules, md)
    write_card(
        path,
        preferred_weight=1.0,
        activation_text=trigger,
        description=f"Object implantation of {trigger}",
        sd_version={"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[family],
        notes="token embeddings: " + ", ".join(listed.values()),
        overwrite=False,
    )
    return path


def test_missing_embedding_is_an_error_naming_the_path(tmp_path):
    from lib_ostaf.files.adapter_file import load_adapter
    from lib_ostaf.method.embeddings import adapter_embeddings, embedding_files

    path = write_object_adapter(tmp_path, tokens=("<mug1>", "<cup2>"))
    found = adapter_embeddings(load_adapter(path))
    assert list(found) == ["<mug1>", "<cup2>"] and found["<cup2>"][0].shape == (1, 8)
    missing = tmp_path / "mug.embeddings" / "cup2.safetensors"
    missing.unlink()  # before: <mug1> alone, <cup2> silently absent
    with pytest.raises(AdapterFileError, match="<cup2> is missing") as err:
        adapter_embeddings(load_adapter(path))
    assert str(missing) in str(err.value)
    with pytest.raises(AdapterFileError, match=r"cup2\.safetensors"):
        embedding_files(load_adapter(path))


def test_listed_elsewhere_falls_back_to_the_adapters_own_folder(tmp_path):
    """A WebUI writes the embeddings into its embeddings folder and lists that path; a copy
    (a share) has them in ``<name>.embeddings/`` instead: both are found, same vectors."""
    import shutil

    from lib_ostaf.files.adapter_file import load_adapter
    from lib_ostaf.method.embeddings import adapter_embeddings, embedding_files

    lora_dir, emb_dir = tmp_path / "models" / "Lora", tmp_path / "embeddings"
    lora_dir.mkdir(parents=True)
    path = write_object_adapter(lora_dir, embeddings_dir=emb_dir)
    adapter = load_adapter(path)
    assert embedding_files(adapter) == {"<mug1>": lora_dir / "../../embeddings/mug1.safetensors"}
    want = adapter_embeddings(adapter)["<mug1>"][0]
    copy_dir = tmp_path / "copy"
    (copy_dir / "mug.embeddings").mkdir(parents=True)
    shutil.copy(path, copy_dir)
    shutil.copy(emb_dir / "mug1.safetensors", copy_dir / "mug.embeddings")
    copied = load_adapter(copy_dir / "mug.safetensors")
    assert embedding_files(copied) == {"<mug1>": copy_dir / "mug.embeddings" / "mug1.safetensors"}
    assert torch.equal(adapter_embeddings(copied)["<mug1>"][0], want)


def test_webui_warns_once_with_the_path(tmp_path):
    """``wanted_tokens`` (both WebUI appliers): one message naming the missing file, at the
    adapter's first use in this process; the other adapter's tokens still come."""
    from types import SimpleNamespace

    from lib_ostaf.files.adapter_file import load_adapter
    from lib_ostaf.hosts.webui_common import wanted_tokens

    broken = write_object_adapter(tmp_path, "broken")
    fine = write_object_adapter(tmp_path, "fine", tokens=("<cup2>",))
    missing = tmp_path / "broken.embeddings" / "mug1.safetensors"
    missing.unlink()
    planned = [
        SimpleNamespace(adapter=load_adapter(p), weight=1.0, name=p.stem) for p in (broken, fine)
    ]
    wanted, messages = wanted_tokens(planned, "sd1")
    assert list(wanted) == ["<cup2>"]
    assert len(messages) == 1 and str(missing) in messages[0]
    assert messages[0].startswith("OSTAF: broken: ") and "not available" in messages[0]
    for _ in range(3):  # every later generation: the tokens still skipped, no new message
        wanted, messages = wanted_tokens(planned, "sd1")
        assert list(wanted) == ["<cup2>"] and messages == []
