"""Behaviour of lib_ostaf.files.adapter_file: kohya LoRA files, hashes, atomic writes,
hostile input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_ostaf.errors import AdapterFileError, InputError
from lib_ostaf.files import adapter_file as af
from lib_ostaf.files import atomic
from lib_ostaf.files.adapter_file import (
    AdapterFile,
    LoraModule,
    load_adapter,
    load_state,
    lora_modules,
    lora_state_dict,
    save_adapter,
    save_state,
)
from lib_ostaf.files.filenames import ADAPTER_SUFFIX, STATE_SUFFIX, validate_name
from lib_ostaf.files.hashes import file_hashes, sshs_hashes
from lib_ostaf.files.metadata import build_metadata
from lib_ostaf.files.sidecars import write_card, write_preview

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _modules(seed: int = 0, rank: int = 4, dim_in: int = 16, dim_out: int = 12):
    g = torch.Generator().manual_seed(seed)
    return {
        Q: LoraModule(
            torch.randn(rank, dim_in, generator=g), torch.randn(dim_out, rank, generator=g), 2.0
        ),
        K: LoraModule(
            torch.randn(rank, 24, generator=g), torch.randn(dim_out, rank, generator=g), 4.0
        ),
        TE: LoraModule(torch.randn(rank, 8, generator=g), torch.randn(8, rank, generator=g), 1.0),
    }


def _meta(name: str = "ad", **kw) -> dict[str, str]:
    args = dict(
        name=name,
        family="sd1",
        prediction_type="epsilon",
        rank=4,
        alpha=2.0,
        resolution=512,
        method="attribute",
        ostaf={"attribute": "red hair", "default_lambda": 0.8, "targets": ["attn1", "attn2"]},
        trigger_phrase="red hair",
    )
    args.update(kw)
    return build_metadata(**args)


def _save(tmp_path: Path, name: str = "ad", **kw) -> Path:
    return save_adapter(tmp_path / f"{name}{ADAPTER_SUFFIX}", _modules(), _meta(name), **kw)


def _data_section(b: bytes) -> bytes:
    n = int.from_bytes(b[:8], "little")
    return b[8 + n :]


def _raw(header: dict | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def _write(tmp_path: Path, data: bytes, name: str = "x.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_roundtrip_bit_identical(tmp_path: Path, dtype: torch.dtype | None) -> None:
    mods = _modules()
    md = _meta()
    p = save_adapter(tmp_path / "ad.safetensors", mods, md, dtype=dtype)
    loaded = load_adapter(p)
    assert isinstance(loaded, AdapterFile)
    assert set(loaded.modules) == set(mods)
    for name, m in mods.items():
        lm = loaded.modules[name]
        want_dtype = dtype or torch.float32
        assert lm.down.dtype == lm.up.dtype == want_dtype
        assert torch.equal(lm.down, m.down.to(want_dtype))
        assert torch.equal(lm.up, m.up.to(want_dtype))
        assert lm.alpha == m.alpha
    expected = dict(md)
    expected["sshs_model_hash"], expected["sshs_legacy_hash"] = sshs_hashes(
        lora_state_dict(mods, dtype), md
    )
    expected["modelspec.hash_sha256"] = "0x" + expected["sshs_model_hash"]
    assert loaded.metadata == expected
    assert loaded.family == "sd1"
    assert loaded.prediction_type == "epsilon"
    assert loaded.default_lambda == 0.8
    assert loaded.name == "ad"
    assert loaded.rank == 4
    assert loaded.embeddings == {}
    assert os.listdir(tmp_path) == ["ad.safetensors"]


def test_key_set_is_exactly_kohya(tmp_path: Path) -> None:
    raw = safetensors.torch.load_file(str(_save(tmp_path)))
    expected = {
        m + s for m in (Q, K, TE) for s in (".lora_down.weight", ".lora_up.weight", ".alpha")
    }
    assert set(raw) == expected
    assert raw[Q + ".lora_down.weight"].shape == (4, 16)
    assert raw[Q + ".lora_up.weight"].shape == (12, 4)
    alpha = raw[Q + ".alpha"]
    assert alpha.shape == () and alpha.dtype == torch.float32 and alpha.item() == 2.0


def test_delta_is_alpha_over_rank_up_down() -> None:
    down = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])  # [r=2, in=3]
    up = torch.tensor([[1.0, 0.0], [2.0, 1.0]])  # [out=2, r=2]
    m = LoraModule(down, up, alpha=1.0)  # scale = 1/2
    assert m.rank == 2
    expected = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.5, 2.5]])
    assert torch.equal(m.delta(), expected)
    assert m.delta(torch.float16).dtype == torch.float16
    half = LoraModule(down.half(), up.half(), alpha=4.0)  # computed in fp32 anyway
    assert torch.equal(half.delta(), 2 * (up @ down))


def test_lora_state_dict_is_contiguous_copies() -> None:
    base = torch.randn(16, 4)
    m = LoraModule(base.t(), torch.randn(8, 4), 4.0)  # non-contiguous down
    sd = lora_state_dict({Q: m})
    assert all(t.is_contiguous() for t in sd.values())
    sd[Q + ".lora_down.weight"].zero_()
    assert base.abs().sum() > 0  # not aliased


def test_missing_alpha_means_alpha_equals_rank() -> None:
    sd = lora_state_dict(_modules())
    del sd[Q + ".alpha"]
    mods = lora_modules(sd)
    assert mods[Q].alpha == 4.0
    assert torch.allclose(mods[Q].delta(), mods[Q].up @ mods[Q].down)


def test_conv_1x1_accepted_and_layout_preserved(tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    down, up = torch.randn(4, 320, 1, 1), torch.randn(320, 4, 1, 1)
    m = LoraModule(down, up, 4.0)
    assert m.conv1x1 and m.down.shape == (4, 320) and m.rank == 4
    p = save_adapter(tmp_path / "c.safetensors", {name: m}, _meta("c"))
    raw = safetensors.torch.load_file(str(p))
    assert raw[name + ".lora_down.weight"].shape == (4, 320, 1, 1)
    assert raw[name + ".lora_up.weight"].shape == (320, 4, 1, 1)
    back = load_adapter(p).modules[name]
    assert back.conv1x1 and torch.equal(back.down, down[:, :, 0, 0])


# --------------------------------------------------------------------------- hashes


def test_sshs_model_hash_is_data_section_sha256_and_metadata_independent(tmp_path: Path) -> None:
    p1 = _save(tmp_path, "one")
    p2 = save_adapter(
        tmp_path / "two.safetensors",
        _modules(),
        _meta("two", title="other", trigger_phrase="x", resolution=768, rank=5),
    )
    b1, b2 = p1.read_bytes(), p2.read_bytes()
    md1, md2 = load_adapter(p1).metadata, load_adapter(p2).metadata
    assert md1["sshs_model_hash"] == hashlib.sha256(_data_section(b1)).hexdigest()
    assert md1["sshs_model_hash"] == md2["sshs_model_hash"]
    assert hashlib.sha256(b1).hexdigest() != hashlib.sha256(b2).hexdigest()
    h = file_hashes(p1)
    assert h["sha256"] == hashlib.sha256(b1).hexdigest()
    assert h["addnet"] == md1["sshs_model_hash"]
    assert h["short"] == md1["sshs_model_hash"][:12]
    # small file: the legacy slice is empty, as in kohya/addnet
    assert md1["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    # different weights -> different hash
    p3 = save_adapter(tmp_path / "three.safetensors", _modules(seed=1), _meta("three"))
    assert load_adapter(p3).metadata["sshs_model_hash"] != md1["sshs_model_hash"]


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_modelspec_hash_is_tensor_bytes_sha256(tmp_path: Path, dtype: torch.dtype | None) -> None:
    """``modelspec.hash_sha256`` = 0x + SHA-256 of everything after the header, parsed here
    independently (8-byte little-endian length, JSON header); sshs has no 0x, lowercase."""
    p = save_adapter(tmp_path / "ad.safetensors", _modules(), _meta(), dtype=dtype)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    digest = hashlib.sha256(raw[8 + n :]).hexdigest()
    md = header["__metadata__"]
    assert md["modelspec.hash_sha256"] == "0x" + digest
    assert md["sshs_model_hash"] == digest == digest.lower()
    assert load_adapter(p).metadata["modelspec.hash_sha256"] == "0x" + digest
    # only kohya keys beside the metadata: the new keys change no tensor
    assert all(k.startswith("lora_") for k in header if k != "__metadata__")
    # a stale hash in the given metadata is replaced, not kept
    stale = _meta() | {"modelspec.hash_sha256": "0xdead"}
    q = save_adapter(tmp_path / "b.safetensors", _modules(), stale, dtype=dtype)
    assert load_adapter(q).metadata["modelspec.hash_sha256"] == "0x" + digest


def test_usage_hint_names_the_lambda_range_and_trigger() -> None:
    md = _meta()  # default λ 0.8, trigger "red hair"
    assert md["modelspec.usage_hint"] == (
        "LoRA weight (λ) 0 to 1.5, default 0.8; 0 is the base model. Trigger: red hair."
    )
    plain = _meta(trigger_phrase="", ostaf={})
    want = "LoRA weight (λ) 0 to 1.5, default 1; 0 is the base model."
    assert plain["modelspec.usage_hint"] == want


def test_sshs_legacy_hash_large_file_matches_kohya_definition(tmp_path: Path) -> None:
    mods = {Q: LoraModule(torch.randn(64, 4096), torch.randn(4096, 64), 64.0)}  # ~2 MiB
    md = _meta(rank=64, alpha=64.0)
    p = save_adapter(tmp_path / "ad.safetensors", mods, md)
    assert p.stat().st_size > 0x110000
    # kohya precalculate_safetensors_hashes, re-implemented independently
    ss = {k: v for k, v in md.items() if k.startswith("ss_")}
    b = io.BytesIO(safetensors.torch.save(lora_state_dict(mods), ss))
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(8 + n)
    model = hashlib.sha256(b.read()).hexdigest()
    loaded = load_adapter(p).metadata
    assert loaded["sshs_legacy_hash"] == legacy != hashlib.sha256(b"").hexdigest()[:8]
    assert loaded["sshs_model_hash"] == model == file_hashes(p)["addnet"]


# --------------------------------------------------------------------------- metadata


def test_build_metadata_values() -> None:
    md = _meta()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["ss_v2"] == "False"
    assert md["ss_base_model_version"] == "sd_v1"
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert json.loads(md["ss_network_args"]) == {}
    assert md["ss_output_name"] == "ad"
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.implementation"] == "diffusers"
    assert md["modelspec.resolution"] == "512x512"
    assert md["modelspec.prediction_type"] == "epsilon"
    assert md["modelspec.trigger_phrase"] == "red hair"
    assert md["modelspec.title"] == "ad"
    assert md["ostaf.attribute"] == "red hair"
    assert md["ostaf.default_lambda"] == "0.8"
    assert json.loads(md["ostaf.targets"]) == ["attn1", "attn2"]
    assert md["ostaf.method"] == "attribute"
    assert "ostaf.version" in md

    v2 = _meta(family="sd2", prediction_type="v_prediction", resolution=768)
    assert v2["ss_v2"] == "True" and v2["ss_base_model_version"] == "sd_v2_v"
    assert v2["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v2["modelspec.prediction_type"] == "v"
    assert _meta(family="sd2")["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    xl = _meta(family="sdxl", resolution=1024, trigger_phrase="")
    assert xl["ss_base_model_version"] == "sdxl_base_v1-0" and xl["ss_v2"] == "False"
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert xl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert xl["modelspec.resolution"] == "1024x1024"
    assert "modelspec.trigger_phrase" not in xl

    for fam, meta in (("sd2", v2), ("sdxl", xl)):
        assert AdapterFile(Path("a.safetensors"), {}, meta).family == fam
    assert AdapterFile(Path("a.safetensors"), {}, v2).prediction_type == "v_prediction"
    assert AdapterFile(Path("a.safetensors"), {}, {}).family is None
    assert AdapterFile(Path("a.safetensors"), {}, {}).default_lambda == 1.0
    bad = {"ostaf.default_lambda": "nan"}
    assert AdapterFile(Path("a.safetensors"), {}, bad).default_lambda == 1.0


@pytest.mark.parametrize(
    "kw",
    [
        {"family": "sd3"},
        {"prediction_type": "flow"},
        {"rank": 0},
        {"alpha": float("nan")},
        {"resolution": -1},
        {"method": "style"},
        {"name": "../x"},
        {"ostaf": {"bad": object()}},
    ],
)
def test_build_metadata_rejects_bad_values(kw: dict) -> None:
    with pytest.raises(InputError):
        _meta(**kw)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/b",
        "a\\b",
        "a\x00b",
        "x" * 300,
        "",
        "   ",
        ".hidden",
        "a..b",
        "tab\tname",
        "a:b",
        "a*b",
        "con",
        "NUL",
        "a\u200bb",
        " lead",
    ],
)
def test_bad_names_rejected(name: str) -> None:
    with pytest.raises(InputError) as e:
        validate_name(name)
    assert str(e.value)


@pytest.mark.parametrize("name", ["red_hair", "Café 猫 v1.5 (test)+x", "a-b", "x" * 100, "ébène"])
def test_good_names_accepted(name: str) -> None:
    assert validate_name(name) == name


def test_save_refuses_bad_stem_and_suffix(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        save_adapter(tmp_path / "..safetensors", _modules(), _meta())
    with pytest.raises(InputError):
        save_adapter(tmp_path / "ad.pt", _modules(), _meta())
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- atomic writes


def test_overwrite_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _save(tmp_path)
    before = p.read_bytes()

    def boom(*a, **k):
        raise AssertionError("work done before the overwrite check")

    monkeypatch.setattr(af, "lora_state_dict", boom)
    with pytest.raises(InputError, match="already exists"):
        save_adapter(p, _modules(seed=3), _meta())
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["ad.safetensors"]
    # with overwrite=True it is replaced
    save_adapter(p, _modules(seed=3), _meta(), overwrite=True)
    assert p.read_bytes() != before
    assert os.listdir(tmp_path) == ["ad.safetensors"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_replace_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    p = _save(tmp_path)
    before = p.read_bytes()

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(atomic.os, "replace", fail)
    expected = AdapterFileError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        save_adapter(p, _modules(seed=5), _meta(), overwrite=True)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["ad.safetensors"]


def test_failed_new_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", fail)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    def bad_serialise(*a, **k):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(af.safetensors.torch, "save", bad_serialise)
    with pytest.raises(RuntimeError):
        _save(tmp_path)
    assert os.listdir(tmp_path) == []


def test_atomic_write_does_not_clobber_file_created_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "late.json"
    real_fsync = os.fsync

    def racing_fsync(fd: int) -> None:
        real_fsync(fd)
        if not p.exists():
            p.write_bytes(b"other writer")

    monkeypatch.setattr(atomic.os, "fsync", racing_fsync)
    with pytest.raises(InputError):
        atomic.atomic_write(p, b"mine", overwrite=False)
    assert p.read_bytes() == b"other writer"
    assert os.listdir(tmp_path) == ["late.json"]


def test_fp16_overflow_refused(tmp_path: Path) -> None:
    mods = {Q: LoraModule(torch.full((2, 4), 1e6), torch.ones(4, 2), 2.0)}
    with pytest.raises(InputError, match="overflow"):
        save_adapter(tmp_path / "o.safetensors", mods, _meta("o"), dtype=torch.float16)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "mods",
    [
        {"unet.to_q": LoraModule(torch.ones(2, 4), torch.ones(4, 2), 2.0)},
        {Q: LoraModule(torch.ones(2, 4), torch.ones(4, 3), 2.0)},
        {Q: LoraModule(torch.ones(2, 4), torch.ones(4, 2), 0.0)},
        {Q: LoraModule(torch.ones(2, 4, dtype=torch.int32), torch.ones(4, 2), 2.0)},
        {Q: LoraModule(torch.full((2, 4), float("nan")), torch.ones(4, 2), 2.0)},
        {},
    ],
)
def test_save_rejects_bad_modules(tmp_path: Path, mods: dict) -> None:
    with pytest.raises(InputError):
        save_adapter(tmp_path / "b.safetensors", mods, _meta("b"))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- hostile files


def test_torn_files(tmp_path: Path) -> None:
    good = _save(tmp_path).read_bytes()
    n = int.from_bytes(good[:8], "little")
    for cut in sorted({0, 3, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 5, len(good) - 1}):
        p = _write(tmp_path, good[:cut], f"torn{cut}.safetensors")
        with pytest.raises(AdapterFileError) as e:
            load_adapter(p)
        assert p.name in str(e.value)
    with pytest.raises(AdapterFileError, match="trailing"):
        load_adapter(_write(tmp_path, good + b"\0", "long.safetensors"))


F32_8 = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (_raw({"a": F32_8}, bytes(32), n=2**40), "limit"),
        (_raw({"a": F32_8}, bytes(32), n=10_000), "header says"),
        (_raw(b"not json at all", bytes(32)), "JSON"),
        (_raw(b"[1, 2]", b""), "JSON"),
        (_raw(b'{"a": 1, "a": 2}', b""), "duplicate"),
        (_raw(b"\xff\xfe{}", b""), "JSON"),
        (_raw({"a": {**F32_8, "data_offsets": [0, 64]}}, bytes(32)), "needs"),
        (_raw({"a": {**F32_8, "data_offsets": [0, 32]}}, bytes(16)), "truncated"),
        (_raw({"a": {**F32_8, "shape": [2, 5]}}, bytes(32)), "needs"),
        (_raw({"a": {**F32_8, "data_offsets": [32, 0]}}, bytes(32)), "bytes"),
        (_raw({"a": F32_8, "b": F32_8}, bytes(32)), "overlaps"),
        (_raw({"a": {**F32_8, "data_offsets": [8, 40]}}, bytes(40)), "gap"),
        (_raw({"a": {**F32_8, "dtype": "Q4"}}, bytes(32)), "dtype"),
        (_raw({"a": {**F32_8, "shape": [2, -4]}}, bytes(32)), "shape"),
        (_raw({"a": {**F32_8, "shape": [2.0, 4]}}, bytes(32)), "shape"),
        (_raw({"a": {**F32_8, "data_offsets": [0]}}, bytes(32)), "offsets"),
        (_raw({"a": {**F32_8, "extra": 1}}, bytes(32)), "exactly"),
        (_raw({"__metadata__": {"k": 1}}, b""), "__metadata__"),
        (_raw(b'{"a": NaN}', b""), "JSON"),
        (_raw({}, b""), "no LoRA"),
        (b"\x01\x02", "too short"),
    ],
)
def test_lying_headers(tmp_path: Path, raw: bytes, match: str) -> None:
    p = _write(tmp_path, raw)
    with pytest.raises(AdapterFileError, match=match) as e:
        load_adapter(p)
    assert str(p) in str(e.value)


def test_pickle_files_refused(tmp_path: Path) -> None:
    for suffix in (".pt", ".ckpt", ".bin", ".pth"):
        p = tmp_path / f"evil{suffix}"
        torch.save(lora_state_dict(_modules()), p)
        with pytest.raises(AdapterFileError, match="pickle"):
            load_adapter(p)
    disguised = tmp_path / "evil.safetensors"
    torch.save(lora_state_dict(_modules()), disguised)
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(disguised)
    with pytest.raises(AdapterFileError, match=r"only \.safetensors"):
        load_adapter(_write(tmp_path, b"", "x.txt"))


def _st_file(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "s.safetensors") -> Path:
    p = tmp_path / name
    safetensors.torch.save_file(state, str(p))
    return p


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.__setitem__(Q + ".lora_up.weight", torch.full((12, 4), float("nan"))), "NaN"),
        (
            lambda s: s.__setitem__(Q + ".lora_down.weight", torch.ones(4, 16, dtype=torch.int32)),
            "float",
        ),
        (
            lambda s: s.__setitem__(
                "unet.down_blocks.0.attn1.to_q.lora_A.weight", torch.ones(4, 16)
            ),
            "not a kohya",
        ),
        (lambda s: s.__setitem__(Q + ".hada_w1_a", torch.ones(4, 16)), "not a kohya"),
        (lambda s: s.__setitem__(Q + ".dora_scale", torch.ones(1, 16)), "not a kohya"),
        (lambda s: s.pop(K + ".lora_up.weight"), "missing"),
        (lambda s: s.pop(K + ".lora_down.weight"), "missing"),
        (lambda s: s.__setitem__(Q + ".lora_up.weight", torch.ones(12, 3)), "rank mismatch"),
        (lambda s: s.__setitem__(Q + ".lora_down.weight", torch.ones(4, 16, 3, 3)), "conv"),
        (lambda s: s.__setitem__(Q + ".lora_down.weight", torch.ones(4, 16, 2)), "shape"),
        (lambda s: s.__setitem__(Q + ".alpha", torch.ones(3)), "alpha"),
        (lambda s: s.__setitem__(Q + ".alpha", torch.tensor(-1.0)), "alpha"),
        (lambda s: s.__setitem__("bundle_emb.x", torch.ones(3)), "bundled"),
    ],
)
def test_bad_tensors(tmp_path: Path, mutate, match: str) -> None:
    state = lora_state_dict(_modules())
    mutate(state)
    p = _st_file(tmp_path, state)
    with pytest.raises(AdapterFileError, match=match) as e:
        load_adapter(p)
    assert str(p) in str(e.value)


def test_bundled_embeddings_returned_separately(tmp_path: Path) -> None:
    state = lora_state_dict(_modules())
    state["bundle_emb.mytok.string_to_param.*"] = torch.randn(2, 768)
    state["bundle_emb.xltok.clip_l"] = torch.randn(1, 768)
    state["bundle_emb.xltok.clip_g"] = torch.randn(1, 1280)
    loaded = load_adapter(_st_file(tmp_path, state))
    assert set(loaded.modules) == {Q, K, TE}
    assert set(loaded.embeddings) == {"mytok", "xltok"}
    assert torch.equal(
        loaded.embeddings["mytok"]["string_to_param.*"], state["bundle_emb.mytok.string_to_param.*"]
    )
    assert set(loaded.embeddings["xltok"]) == {"clip_l", "clip_g"}


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter(tmp_path / "nope.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(AdapterFileError):
        load_adapter(tmp_path / "dir.safetensors")


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzz_mutations_load_or_adapter_file_error(tmp_path: Path, data: st.DataObject) -> None:
    good = _fuzz_base(tmp_path)
    n = int.from_bytes(good[:8], "little")
    buf = bytearray(good)
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[: data.draw(st.integers(0, len(buf) - 1), label="cut")]
    else:
        hot = st.integers(0, min(len(buf) - 1, 8 + n + 8))  # header region, where parsing happens
        pos = st.one_of(hot, st.integers(0, len(buf) - 1))
        for i, b in data.draw(
            st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=4)
        ):
            buf[i] = b
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(buf))
    try:
        loaded = load_adapter(p)
    except AdapterFileError as e:
        assert str(p) in str(e)
        return
    if bytes(buf) == good:
        ref = load_adapter(tmp_path / "base.safetensors")
        assert loaded.metadata == ref.metadata
        for k, m in ref.modules.items():
            assert torch.equal(loaded.modules[k].down, m.down)
            assert torch.equal(loaded.modules[k].up, m.up)
    else:
        assert all(
            torch.isfinite(m.down).all() and torch.isfinite(m.up).all()
            for m in loaded.modules.values()
        )


def _fuzz_base(tmp_path: Path) -> bytes:
    p = tmp_path / "base.safetensors"
    if not p.exists():
        mods = {
            Q: LoraModule(torch.randn(2, 4), torch.randn(3, 2), 2.0),
            TE: LoraModule(torch.randn(2, 3), torch.randn(3, 2), 1.0),
        }
        save_adapter(p, mods, _meta("base"), dtype=torch.float16)
    return p.read_bytes()


# --------------------------------------------------------------------------- sidecars


def test_state_roundtrip(tmp_path: Path) -> None:
    tensors = {
        "hyper.w": torch.randn(3, 5),
        "steps": torch.tensor([7], dtype=torch.int64),
        "h": torch.randn(4).half(),
    }
    config = {"rank": 4, "targets": ["attn1"], "lr": 1e-4, "name": "猫"}
    p = save_state(tmp_path / f"ad{STATE_SUFFIX}", tensors, config, overwrite=False)
    assert p.name == "ad.ostaf-state"
    back, cfg = load_state(p)
    assert cfg == config
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    with pytest.raises(InputError, match="already exists"):
        save_state(p, tensors, config, overwrite=False)
    with pytest.raises(InputError):
        save_state(tmp_path / "x.safetensors", tensors, config, overwrite=False)
    with pytest.raises(InputError):
        save_state(
            tmp_path / "y.ostaf-state", {"a": torch.tensor([float("inf")])}, {}, overwrite=False
        )
    # a LoRA file is not a state file and vice versa
    lora = _save(tmp_path)
    with pytest.raises(AdapterFileError):
        load_state(lora)
    with pytest.raises(AdapterFileError):
        load_adapter(p)
    torn = tmp_path / "torn.ostaf-state"
    torn.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(AdapterFileError):
        load_state(torn)


def test_card_and_preview(tmp_path: Path) -> None:
    from PIL import Image

    stem = tmp_path / "ad"
    c = write_card(
        stem,
        preferred_weight=0.8,
        activation_text="red hair",
        description="OSTAF attribute",
        sd_version="SD1",
        notes="λ 0.8",
        overwrite=False,
    )
    assert c.name == "ad.json"
    assert json.loads(c.read_text(encoding="utf-8")) == {
        "description": "OSTAF attribute",
        "sd version": "SD1",
        "activation text": "red hair",
        "preferred weight": 0.8,
        "negative text": "",
        "notes": "λ 0.8",
    }
    # refused: the existing card (a path ending in .safetensors is accepted too), an
    # unknown sd version
    for path, sd_version in ((tmp_path / "ad.safetensors", "SD1"), (tmp_path / "z", "SD3")):
        with pytest.raises(InputError):
            write_card(
                path,
                preferred_weight=1,
                activation_text="",
                description="",
                sd_version=sd_version,
                overwrite=False,
            )
    img = Image.new("RGB", (8, 6), (255, 0, 0))
    pv = write_preview(tmp_path / "ad.v1.5", img, overwrite=False)
    assert pv.name == "ad.v1.5.preview.png"
    with Image.open(pv) as back:
        assert back.size == (8, 6) and back.getpixel((0, 0)) == (255, 0, 0)
    write_preview(tmp_path / "ad.v1.5", Image.new("CMYK", (4, 4)), overwrite=True)
    with pytest.raises(InputError):
        write_preview(tmp_path / "q", "not an image", overwrite=False)  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == ["ad.json", "ad.v1.5.preview.png"]


# --------------------------------------------------------------------------- host compatibility


def test_diffusers_kohya_conversion_accepts_our_keys(tmp_path: Path) -> None:
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    fn = getattr(conv, "_convert_non_diffusers_lora_to_diffusers", None)
    if fn is None:
        pytest.skip("diffusers lacks _convert_non_diffusers_lora_to_diffusers")
    raw = safetensors.torch.load_file(str(_save(tmp_path)))
    new_sd, alphas = fn(dict(raw))
    assert len(new_sd) == 6  # 3 modules x (down, up)
    assert any(k.startswith("unet.") for k in new_sd)
    assert any(k.startswith("text_encoder.") for k in new_sd)
    assert sorted(alphas.values()) == [1.0, 2.0, 4.0]
