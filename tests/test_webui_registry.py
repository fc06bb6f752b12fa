"""The adapters folder: path safety, listing, caching, preferred weights."""

from __future__ import annotations

import os

import pytest

from lib_ostaf.errors import InputError
from lib_ostaf.webui.registry import AdapterRegistry, resolve_adapters_dir

from .unets import tiny_ldm_unet
from .webui_fakes import make_adapter


@pytest.fixture(scope="module")
def unet():
    return tiny_ldm_unet("sd1")


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "..",
        "a/b",
        "a\\b",
        "/etc/passwd",
        "x\x00y",
        ".hidden",
        "",
        " x",
        "a" * 101,
        "C:evil",
        "con",
        "a:b",
        "a,b",
        "<x>",
    ],
)
def test_unsafe_names_are_refused(tmp_path, name):
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(InputError):
        reg.path_for(name)
    with pytest.raises(InputError):
        reg.load(name)


def test_symlink_escape_is_refused(tmp_path, unet):
    outside = tmp_path / "outside"
    outside.mkdir()
    make_adapter(outside, "secret", unet)
    root = tmp_path / "adapters"
    root.mkdir()
    os.symlink(outside / "secret.safetensors", root / "link.safetensors")
    reg = AdapterRegistry(root)
    assert reg.names() == []  # not listed
    with pytest.raises(InputError, match="outside the adapters folder"):
        reg.load("link")
    with pytest.raises(InputError, match="outside"):
        reg.check_inside(root / ".." / "outside" / "secret.safetensors")


def test_listing_cache_and_weights(tmp_path, unet):
    reg = AdapterRegistry(lambda: tmp_path)
    make_adapter(tmp_path, "b_style", unet, seed=1, preferred=0.6, description="<b>hi</b>")
    make_adapter(tmp_path, "A_shape", unet, attribute="shape", seed=2)
    (tmp_path / "broken.safetensors").write_bytes(b"\x80\x04not safetensors")
    (tmp_path / "notes.txt").write_text("x")
    assert reg.names() == ["A_shape", "b_style", "broken"]
    entries = {e.name: e for e in reg.entries()}
    assert entries["b_style"].weight == 0.6 and entries["A_shape"].weight == 0.7  # card / file
    assert entries["A_shape"].attribute == "shape" and entries["A_shape"].family == "sd1"
    assert entries["b_style"].description == "<b>hi</b>"  # raw; cards.py escapes
    assert entries["broken"].error and "pickle" in entries["broken"].error
    assert len(entries["b_style"].short_hash) == 12
    first = reg.load("b_style")
    assert reg.load("b_style") is first  # cached while unchanged
    make_adapter(tmp_path, "b_style", unet, seed=9)  # retrained under the same name
    second = reg.load("b_style")
    assert second is not first and second.identity != first.identity
    with pytest.raises(InputError, match="not found"):
        reg.load("missing")


def test_resolve_adapters_dir(tmp_path):
    assert resolve_adapters_dir("/flag", "/setting", tmp_path).as_posix() == "/flag"
    assert resolve_adapters_dir(None, "/setting", tmp_path).as_posix() == "/setting"
    assert resolve_adapters_dir(None, " ", tmp_path) == tmp_path / "ostaf"
