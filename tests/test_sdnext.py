"""SD.Next (vladmandic/sdnext, master 058a7f0c): detected by feature, one line at load and
nothing registered; OSTAF files still load through SD.Next's own LoRA.

The fakes restate SD.Next's code, never lib_ostaf's naming:
- ``modules/shared.py``: ``class Backend(Enum): ORIGINAL = 1; DIFFUSERS = 2``,
  ``backend = Backend.DIFFUSERS``, ``native = backend == Backend.DIFFUSERS``;
- ``modules/scripts_manager.py`` ``load_scripts.register_scripts_from_module``: every
  ``type`` in the script module's ``__dict__`` that subclasses ``Script`` is registered;
- ``modules/lora/lora_convert.py``: ``assign_network_names_to_compvis_modules`` names each
  UNet module ``"lora_unet_" + name.replace(".", "_")`` (diffusers module names), and
  ``KeyConvert`` first rewrites an ldm/sgm prefix to its diffusers one (the conversion
  map, restated below for the attention blocks) found by ``bisect`` + ``startswith``.
"""

from __future__ import annotations

import bisect
import enum
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from .test_webui_script import _fake_gradio
from .unets import tiny_diffusers_unet
from .webui_fakes import fake_script_modules, load_script, make_adapter

ROOT = Path(__file__).resolve().parents[1]


class Backend(enum.Enum):  # SD.Next modules/shared.py
    ORIGINAL = 1
    DIFFUSERS = 2


def _load_script(tmp_path, monkeypatch, backend: Backend | None):
    fakes = fake_script_modules(tmp_path)
    shared = fakes["modules.shared"]
    if backend is not None:
        shared.backend = backend
        shared.native = backend == Backend.DIFFUSERS
    for name, mod in {**fakes, "gradio": _fake_gradio()}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    module = load_script(ROOT / "scripts" / "ostaf.py")
    return module, fakes


def _registered_scripts(module, fakes) -> list[type]:
    """SD.Next's register_scripts_from_module."""
    script = fakes["modules.scripts"].Script
    return [c for c in module.__dict__.values() if type(c) is type and issubclass(c, script)]


def test_sdnext_one_line_and_nothing_registered(tmp_path, monkeypatch, capsys):
    module, fakes = _load_script(tmp_path, monkeypatch, Backend.DIFFUSERS)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == [module.SDNEXT_MESSAGE]
    assert "SD.Next" in lines[0] and "<lora:name:λ>" in lines[0] and "not available" in lines[0]
    assert module.SDNEXT is True
    assert fakes["modules.script_callbacks"].registered == {}
    assert fakes["modules.shared"].options_templates == {}
    assert _registered_scripts(module, fakes) == []
    assert fakes["modules.extra_networks"].registered == []
    assert fakes["modules.ui_extra_networks"].pages == []


@pytest.mark.parametrize("backend", [None, Backend.ORIGINAL])
def test_other_hosts_get_everything(tmp_path, monkeypatch, capsys, backend):
    """A1111/Forge (no ``shared.backend``), and an ldm backend: the full extension."""
    module, fakes = _load_script(tmp_path, monkeypatch, backend)
    assert module.SDNEXT is False
    assert "SD.Next" not in capsys.readouterr().out
    assert len(fakes["modules.script_callbacks"].registered) == 6
    assert "ostaf_dir" in fakes["modules.shared"].options_templates
    assert [c.__name__ for c in _registered_scripts(module, fakes)] == ["OstafScript"]


def _sdnext_mapping(unet) -> dict[str, object]:
    """lora_convert.assign_network_names_to_compvis_modules, UNet part."""
    return {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules()}


def _sdnext_conversion_map() -> dict[str, str]:
    """make_unet_conversion_map's attention-block entries (the blocks OSTAF targets), as
    ``sd.replace(".", "_")[:-1] -> hf.replace(".", "_")[:-1]``."""
    pairs = []
    for i in range(4):
        for j in range(2):
            if i < 3:
                pairs.append(
                    (f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")
                )
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    return {sd.replace(".", "_")[:-1]: hf.replace(".", "_")[:-1] for sd, hf in pairs}


def _sdnext_convert(key: str, mapping: dict, conversion: dict):
    """KeyConvert.__call__ (UNet keys)."""
    map_keys = sorted(conversion)
    search_key = key.replace("lora_unet_", "")
    map_key = map_keys[bisect.bisect_right(map_keys, search_key) - 1]
    if search_key.startswith(map_key):
        key = key.replace(map_key, conversion[map_key])
    return mapping.get(key)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_files_load_through_sdnext_lora(tmp_path, family):
    """Every module of an OSTAF file finds its layer in SD.Next's diffusers UNet, with the
    LoRA's shape (SD1 files carry diffusers names, SDXL files sgm names)."""
    unet = tiny_diffusers_unet(family)
    path = make_adapter(tmp_path, f"a_{family}", unet, attribute="shape+appearance", family=family)
    mapping, conversion = _sdnext_mapping(unet), _sdnext_conversion_map()
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        bases = {k.split(".", 1)[0] for k in keys}
        assert len(keys) == 3 * len(bases) > 0
        for base in bases:
            layer = _sdnext_convert(base, mapping, conversion)
            assert layer is not None, base
            up, down = (
                f.get_tensor(base + ".lora_up.weight"),
                f.get_tensor(base + ".lora_down.weight"),
            )
            assert tuple(layer.weight.shape) == (up.shape[0], down.shape[1]), base
        md = f.metadata()
    # SD.Next's NetworkOnDisk.detect_version reads ss_base_model_version first
    base_version = md["ss_base_model_version"].lower()
    assert base_version.startswith("sdxl" if family == "sdxl" else "sd_v1")
