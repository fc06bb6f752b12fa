"""Ready to share: the share folder, its model card, its hashes and A1111's family rule."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lib_ostaf.cli import main
from lib_ostaf.errors import AdapterFileError, InputError
from lib_ostaf.files.adapter_file import LoraModule, load_adapter, save_adapter
from lib_ostaf.files.naming import inspect_unet
from lib_ostaf.files.sidecars import write_card, write_preview
from lib_ostaf.method.targets import TargetSpec, select_targets
from lib_ostaf.webui.share import LICENSES, share_adapter, yaml_str

from .test_embeddings import write_object_adapter
from .unets import tiny_diffusers_unet
from .webui_fakes import rank2_metadata

SWEEP = Image.fromarray(np.arange(16 * 32 * 3, dtype=np.uint8).reshape(16, 32, 3))


def family_adapter(folder: Path, family: str, name: str, unet: torch.nn.Module | None = None):
    """An attribute adapter on the appearance layers of a tiny ``family`` UNet (its kohya
    names: diffusers-style for SD1/SD2, sgm-style for SDXL), card and preview beside it."""
    unet = unet if unet is not None else tiny_diffusers_unet(family)
    info = inspect_unet(unet)
    g = torch.Generator().manual_seed(1)
    modules = {
        t.kohya: LoraModule(
            torch.randn(2, t.in_features, generator=g),
            torch.randn(t.out_features, 2, generator=g),
            2.0,
        )
        for t in select_targets(unet, TargetSpec("appearance"), info)
    }
    md = rank2_metadata(
        name,
        info.family,
        "attribute",
        64,
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
        trigger_phrase="ostafv",
        ostaf={"attribute": "appearance", "default_lambda": 0.8, "prompt": "a ostafv square"},
    )
    path = save_adapter(folder / f"{name}.safetensors", modules, md)
    label = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[family]
    write_card(
        path,
        preferred_weight=0.8,
        activation_text="ostafv",
        description="appearance",
        sd_version=label,
        overwrite=False,
    )
    write_preview(path, Image.new("RGB", (8, 8), (200, 30, 30)), overwrite=False)
    return path


def files_in(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# --------------------------------------------------------------------------- the folder


def test_object_share_has_exactly_the_files_and_a_parsable_card(tmp_path):
    src = tmp_path / "adapters"
    lora = write_object_adapter(src, "mug", tokens=("<mug1>", "<cup2>"))
    write_preview(lora, Image.new("RGB", (8, 8), "red"), overwrite=False)
    out = share_adapter(src, "mug", tmp_path / "out", sweep=SWEEP, sweep_lambdas=[0, 0.5, 1])
    files = files_in(out)
    assert set(files) == {
        "mug.safetensors",
        "mug.embeddings/mug1.safetensors",
        "mug.embeddings/cup2.safetensors",
        "mug.json",
        "mug.preview.png",
        "mug.sweep.png",
        "README.md",
    }
    # byte copies: the hashes the author's images carry are the shared file's
    assert files["mug.safetensors"] == lora.read_bytes()
    for stem in ("mug1", "cup2"):
        assert (
            files[f"mug.embeddings/{stem}.safetensors"]
            == (src / "mug.embeddings" / f"{stem}.safetensors").read_bytes()
        )
    assert files["mug.preview.png"] == (src / "mug.preview.png").read_bytes()
    assert np.array_equal(np.asarray(Image.open(out / "mug.sweep.png")), np.asarray(SWEEP))
    # the shared adapter finds its tokens in the folder
    from lib_ostaf.method.embeddings import adapter_embeddings

    assert list(adapter_embeddings(load_adapter(out / "mug.safetensors"))) == ["<mug1>", "<cup2>"]

    fm = front_matter(out / "README.md")
    assert fm["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert fm["license"] == "creativeml-openrail-m"
    assert fm["instance_prompt"] == "<mug1>, <cup2>"
    assert {"text-to-image", "lora", "diffusers", "stable-diffusion", "template:sd-lora"} <= set(
        fm["tags"]
    )
    assert fm["widget"] == [
        {"text": "a photo of <mug1> and <cup2>", "output": {"url": "mug.preview.png"}},
        {"text": "a photo of <mug1> and <cup2>", "output": {"url": "mug.sweep.png"}},
    ]
    readme = (out / "README.md").read_text(encoding="utf-8")
    for form in ("`<mug1>`", "`mug1`", "`embedding:mug1`", 'token="<mug1>"', "`embedding:cup2`"):
        assert form in readme
    assert "λ sweep 0, 0.5, 1" in readme
    # the A1111 card: the source's fields, every tool's trigger in the notes
    card = json.loads(files["mug.json"])
    assert card["activation text"] == "<mug1>, <cup2>" and card["preferred weight"] == 1.0
    assert card["notes"].startswith("token embeddings: mug.embeddings/mug1.safetensors")
    assert (
        "ComfyUI: embedding:mug1" in card["notes"] and 'diffusers: token="<cup2>"' in card["notes"]
    )
    assert "embeddings folder: mug1;" in card["notes"]


def test_attribute_share_without_picture_or_sweep(tmp_path):
    path = family_adapter(tmp_path / "a", "sd1", "red")
    (tmp_path / "a" / "red.preview.png").unlink()
    out = share_adapter(tmp_path / "a", "red", tmp_path / "out")
    assert set(files_in(out)) == {"red.safetensors", "red.json", "README.md"}
    fm = front_matter(out / "README.md")
    assert "widget" not in fm and fm["instance_prompt"] == "ostafv"
    assert (out / "red.safetensors").read_bytes() == path.read_bytes()
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "LoRA weight (λ) 0 to 1.5, default 0.8" in readme


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_yaml_strings_round_trip(text):
    assert yaml.safe_load(f"k: {yaml_str(text)}") == {"k": text}


# --------------------------------------------------------------------------- hashes


def test_card_hashes_equal_independent_computations(tmp_path):
    path = family_adapter(tmp_path / "a", "sd1", "red")
    out = share_adapter(tmp_path / "a", "red", tmp_path / "out")
    raw = (out / "red.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    autov2 = hashlib.sha256(raw).hexdigest()
    autov3 = hashlib.sha256(raw[8 + n :]).hexdigest()
    readme = (out / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", readme, re.M))
    assert rows["AutoV2 (Civitai: SHA-256 of the file)"] == f"`{autov2[:10].upper()}` (`{autov2}`)"
    assert rows["AutoV3 (Civitai) = `sshs_model_hash`"] == f"`{autov3}`"
    assert rows["A1111 / Forge infotext (AutoV3's first 12)"] == f"`{autov3[:12]}`"
    md = header["__metadata__"]
    assert md["sshs_model_hash"] == autov3 and md["modelspec.hash_sha256"] == "0x" + autov3
    assert autov2 == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- A1111's rule


def a1111_sd_version(metadata: dict[str, str]) -> str:
    """extensions-builtin/Lora/network.py ``NetworkOnDisk.detect_version``, re-written."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def a1111_shows(card_version: str | None, file_version: str, loaded: str) -> bool:
    """ui_extra_networks_lora.py: the card's "sd version" wins over the file's; a known
    version other than the loaded checkpoint's is hidden."""
    version = card_version if card_version in ("SD1", "SD2", "SDXL", "Unknown") else file_version
    return version == "Unknown" or version == loaded


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a1111_family_rule_puts_each_family_in_place(tmp_path, family):
    family_adapter(tmp_path / "a", family, "ad")
    out = share_adapter(tmp_path / "a", "ad", tmp_path / "out")
    label = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[family]
    for folder in (tmp_path / "a", out):  # the source and the shared copy
        adapter = load_adapter(folder / "ad.safetensors")
        card = json.loads((folder / "ad.json").read_text())
        assert a1111_sd_version(adapter.metadata) == label == card["sd version"]
        shown = {m: a1111_shows(card["sd version"], label, m) for m in ("SD1", "SD2", "SDXL")}
        assert shown == {m: m == label for m in shown}  # an SDXL adapter shows on SDXL
    fm = front_matter(out / "README.md")
    assert fm["license"] == LICENSES[family]
    assert (
        fm["base_model"]
        == {
            "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "sd2": "stabilityai/stable-diffusion-2-1",  # v-prediction
            "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
        }[family]
    )
    assert ("stable-diffusion-xl" in fm["tags"]) == (family == "sdxl")
    if family == "sdxl":  # sgm module names, as kohya writes SDXL
        assert all(k.startswith("lora_unet_output_blocks_") for k in adapter.modules)


# --------------------------------------------------------------------------- refusals


def test_bad_inputs_give_one_error_and_write_nothing(tmp_path, capsys):
    src = tmp_path / "a"
    write_object_adapter(src, "mug")
    with pytest.raises(InputError, match="adapter 'nope' not found"):
        share_adapter(src, "nope", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="is not empty"):
        share_adapter(src, "mug", full)
    with pytest.raises(InputError, match="adapters folder itself"):
        share_adapter(src, "mug", src, overwrite=True)
    (src / "mug.embeddings" / "mug1.safetensors").rename(tmp_path / "away.safetensors")
    with pytest.raises(AdapterFileError, match=r"mug1\.safetensors"):
        share_adapter(src, "mug", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert files_in(full) == {"keep.txt": b"mine"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no stage
    # the CLI: one line, exit code 2, before any model is loaded
    code = main(["share", "nope", "--adapters-dir", str(src), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: adapter 'nope'")
    # overwrite: our files replace theirs, a stranger's file stays
    (tmp_path / "away.safetensors").rename(src / "mug.embeddings" / "mug1.safetensors")
    (full / "mug.json").write_text("old")
    share_adapter(src, "mug", full, overwrite=True)
    assert set(files_in(full)) == {
        "keep.txt",
        "mug.safetensors",
        "mug.embeddings/mug1.safetensors",
        "mug.json",
        "README.md",
    }
    assert json.loads((full / "mug.json").read_text())["activation text"] == "<mug1>"


# --------------------------------------------------------------------------- CLI --sweep


def test_cli_share_renders_a_lambda_sweep(tmp_path, sd1_host, one_thread, capsys):
    family_adapter(tmp_path / "a", "sd1", "red", unet=sd1_host.unet)
    args = ["share", "red", "--adapters-dir", str(tmp_path / "a"), "--out", str(tmp_path / "o")]
    args += ["--sweep", "--model", "tiny-sd1", "--lambdas", "0,1", "--steps", "2"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    sweep = np.asarray(Image.open(tmp_path / "o" / "red.sweep.png"), dtype=np.float32)
    base = np.asarray(sd1_host.generate("a ostafv square", seed=0, steps=2), dtype=np.float32)
    h, w = base.shape[:2]
    assert sweep.shape == (h + 14, 2 * w, 3)  # a label strip above λ 0 and λ 1
    assert np.array_equal(sweep[14:, :w], base)  # λ = 0 is the base model
    assert float(np.abs(sweep[14:, w:] - base).mean()) > 1.0  # λ = 1 changes the image
    fm = front_matter(tmp_path / "o" / "README.md")
    assert [x["output"]["url"] for x in fm["widget"]] == ["red.preview.png", "red.sweep.png"]
    assert fm["widget"][1]["text"] == "a ostafv square"
