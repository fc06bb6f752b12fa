"""Auto-detection of a CLIP image tower (lib_ostaf.method.towers): a fake Hugging Face cache and
a fake IP-Adapter folder built in tmp_path from tiny models; nothing is downloaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from lib_ostaf.method.objects import ClipTower
from lib_ostaf.method.towers import find_tower, hf_cache_dirs, tower_fit
from lib_ostaf.world import tiny


def _snapshot(hub, repo: str, model):
    folder = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoders():
    parts = tiny.components("sdxl")
    te1, te2 = parts["text_encoder"], parts["text_encoder_2"]
    clip_l = SimpleNamespace(key="clip_l", width=te1.config.hidden_size, projection_dim=None)
    clip_g = SimpleNamespace(
        key="clip_g", width=te2.config.hidden_size, projection_dim=te2.config.projection_dim
    )
    return te1, te2, clip_l, clip_g


def _env(tmp_path):
    return {"HF_HUB_CACHE": str(tmp_path / "hub"), "HOME": str(tmp_path / "home")}


def test_cache_dirs_follow_the_environment(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path / "home")}
    assert hf_cache_dirs(env) == [tmp_path / "hf" / "hub", tmp_path / "home/.cache/huggingface/hub"]
    env = {"HUGGINGFACE_HUB_CACHE": str(tmp_path / "c"), "HOME": str(tmp_path / "home")}
    assert hf_cache_dirs(env)[0] == tmp_path / "c"


def test_finds_a_matching_clip_model_in_the_cache_and_skips_a_mismatch(tmp_path, encoders):
    te1, te2, clip_l, _ = encoders
    hub = tmp_path / "hub"
    wrong = _snapshot(hub, "someone/image-only", tiny.clip_tower(te2))  # vision-only tower
    right = _snapshot(hub, "openai/clip-vit-large-patch14", tiny.clip_tower(te1))
    found = find_tower([clip_l], env=_env(tmp_path))
    assert found.folder == right
    assert "text width" in found.reason and "found automatically" in found.note()
    assert found.skipped == []  # the known repo is tried first
    alone = find_tower([clip_l], env=_env(tmp_path) | {"HF_HUB_CACHE": str(tmp_path / "none")})
    assert alone.folder is None and "no CLIP image tower found" in alone.note()
    ok, why = tower_fit(wrong, [clip_l])
    assert not ok and "no loaded text encoder has its own projection" in why
    tower = ClipTower.load(found.folder)
    assert tower.text_projection is not None and tower.text_projection.in_features == clip_l.width


def test_ip_adapter_image_encoder_matches_only_its_projection(tmp_path, encoders):
    _, te2, clip_l, clip_g = encoders
    ipa = tmp_path / "models" / "ipadapter"
    proj = int(te2.config.projection_dim)
    bad = CLIPVisionModelWithProjection(CLIPVisionConfig(**tiny.VISION, projection_dim=proj + 8))
    bad.save_pretrained(ipa / "a_other" / "image_encoder")
    good = tiny.clip_tower(te2)
    good.save_pretrained(ipa / "sdxl_models" / "image_encoder")
    (ipa / "loose.safetensors").write_bytes(b"")  # a single file (no config.json): not looked at
    found = find_tower([clip_l, clip_g], [ipa], env=_env(tmp_path))
    assert found.folder == ipa / "sdxl_models" / "image_encoder"
    assert "projection" in found.reason
    (skipped, reason), *_ = found.skipped
    assert skipped == ipa / "a_other" / "image_encoder"
    assert f"projection {proj + 8}" in reason
    none = find_tower([clip_l], [ipa], env=_env(tmp_path))  # SD1: no own projection
    assert none.folder is None and len(none.skipped) == 2
    assert "skipped" in none.note() and "own projection" in none.note()


def test_a_folder_without_weights_or_not_clip_is_skipped(tmp_path, encoders):
    _, _, clip_l, _ = encoders
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"model_type": "clip"}')
    assert "no weights" in tower_fit(tmp_path / "x", [clip_l])[1]
    (tmp_path / "x" / "model.safetensors").write_bytes(b"")
    (tmp_path / "x" / "config.json").write_text('{"model_type": "bert"}')
    assert "not a CLIP model" in tower_fit(tmp_path / "x", [clip_l])[1]
