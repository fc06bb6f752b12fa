"""scripts/ostaf.py on a (fake) Forge 2: the same file picks the Forge host by detection;
one generation patches a clone of ``forge_objects.unet`` in ``process_before_every_sampling``;
the tab's Train button loads the model (nothing loaded at Forge start) and trains."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from PIL import Image

from lib_ostaf.files.adapter_file import load_adapter
from lib_ostaf.files.naming import inspect_unet, module_name_from_kohya
from lib_ostaf.hosts.forge import ForgeApplier

from .forge_fakes import FakeForgeModel, fake_forge_modules
from .test_webui_script import ROOT, _installed_fakes, _p, _Params
from .webui_fakes import load_script, make_adapter


@pytest.fixture()
def glue(tmp_path, monkeypatch, one_thread):
    sd_model = FakeForgeModel()
    fakes, _ = _installed_fakes(tmp_path, monkeypatch, sd_model)
    monkeypatch.setitem(sys.modules, "modules_forge", types.ModuleType("modules_forge"))
    monkeypatch.setitem(sys.modules, "backend.patcher.base", types.ModuleType("base"))
    with fake_forge_modules(sd_model) as forge_fakes:
        # one `modules` package: the script's fakes plus Forge's sd_models/processing
        pkg = sys.modules["modules"] = fakes["modules"]
        for name in ("sd_models", "processing"):
            setattr(pkg, name, getattr(forge_fakes, name))
            sys.modules[f"modules.{name}"] = getattr(forge_fakes, name)
        forge_fakes.shared = fakes["modules.shared"]
        fakes["modules.shared"].sd_model = types.SimpleNamespace()  # nothing loaded yet

        def reload():
            forge_fakes.sd_models.reloads += 1
            fakes["modules.shared"].sd_model = sd_model

        forge_fakes.sd_models.forge_model_reload = reload
        module = load_script(ROOT / "scripts" / "ostaf.py")
        yield types.SimpleNamespace(
            m=module, fakes=fakes, forge=forge_fakes, sd_model=sd_model, dir=tmp_path
        )
        module.APPLIER.reset(sd_model)
    from lib_ostaf.hosts import a1111

    a1111.webui_state().applier = a1111.A1111Applier()  # other tests expect A1111's


def test_forge_is_detected_and_one_generation_patches_a_clone(glue):
    assert glue.m.FORGE and isinstance(glue.m.APPLIER, ForgeApplier)
    sd_model = glue.sd_model
    glue.fakes["modules.shared"].sd_model = sd_model
    unet = sd_model.forge_objects.unet.model.diffusion_model
    make_adapter(glue.dir, "app", unet, seed=1)
    base = {k: v.detach().clone() for k, v in unet.named_parameters()}
    network, script = glue.m.ExtraNetworkOstaf(), glue.m.OstafScript()
    p = _p()
    p.sd_model = sd_model
    script.process(p, False)
    sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
    network.activate(p, [_Params(["app", "0.8"])])
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    script.after_extra_networks_activate(p)
    assert p.extra_generation_params["OSTAF"].startswith("app:0.8 (")
    script.process_before_every_sampling(p)
    assert sd_model.forge_objects.unet is not sd_model.forge_objects_original.unet
    sd_model.forge_objects.unet.refresh_loras()
    info = inspect_unet(unet)
    now = dict(unet.named_parameters())
    adapter = load_adapter(glue.dir / "app.safetensors")
    worst = 0.0
    for key, m in adapter.modules.items():
        w = module_name_from_kohya(key, info) + ".weight"
        worst = max(worst, (now[w] - base[w] - 0.8 * m.delta()).abs().max().item())
    assert worst < 1e-6
    sd_model.forge_objects_original.unet.refresh_loras()  # next job without tags
    assert all(torch.equal(dict(unet.named_parameters())[k], v) for k, v in base.items())


def test_tab_train_button_on_forge_loads_the_model(glue):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    args = ["task(x)", image, "appearance", "forge_run", "ostafv", "", 2, 2, 1e-2, 0]
    args += ["hypernet", False, ["attn2"], ["to_k", "to_v"], "", 1.0, 64, 0, False]
    glue.fakes["modules.shared"].opts.ostaf_sweep = "0, 1"
    glue.fakes["modules.shared"].opts.ostaf_preview_steps = 1
    images, log, card = glue.m._train_ui(*args)
    assert "forge_run" in card and "wrote" in log, (log, card)
    assert glue.forge.sd_models.reloads == 1 and len(images) == 1
    assert (glue.dir / "forge_run.safetensors").is_file()


def _classic_xyz():
    """Forge Classic's X/Y/Z (``extensions-builtin/xyz``): the script module imports
    ``AxisOption`` from ``lib_xyz.classes`` (default ``format_value`` adds the label) and
    ``axis_options`` is ``lib_xyz.builtins.builtin_options``; no ``format_value`` in it."""

    def format_value_add_label(p, opt, x):
        return f"{opt.label}: {round(x, 8) if isinstance(x, float) else x}"

    class AxisOption:
        def __init__(self, label, type, apply, format_value=format_value_add_label, **kw):
            self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
            self.choices = kw.get("choices")

    xyz = types.ModuleType("xyz_grid.py")
    xyz.AxisOption = AxisOption
    xyz.axis_options = [AxisOption("Seed", int, None)]
    return xyz


def test_xyz_axes_on_forge_classic_without_format_value(glue, capsys):
    xyz = _classic_xyz()
    script_class = type("XYZ", (), {"__module__": "xyz_grid.py"})
    other = types.SimpleNamespace(script_class=type("S", (), {}), module=types.ModuleType("x.py"))
    scripts = glue.fakes["modules.scripts"]
    scripts.scripts_data = [other, types.SimpleNamespace(script_class=script_class, module=xyz)]
    before_ui = glue.fakes["modules.script_callbacks"].registered["before_ui"][0]
    before_ui()
    before_ui()  # "Reload UI": no duplicates
    labels = ["Seed", "OSTAF λ", "OSTAF adapter", "OSTAF λ shape", "OSTAF λ appearance"]
    assert [o.label for o in xyz.axis_options] == labels
    lam, adapter = xyz.axis_options[1:3]
    assert lam.format_value(None, lam, 0.25) == "OSTAF λ: 0.25"  # the host's own default
    assert adapter.format_value(None, adapter, "app") == "app"  # as A1111's format_value
    assert adapter.format_value(None, adapter, 0.123456789) == 0.12345679
    p = types.SimpleNamespace()
    lam.apply(p, "0.5", None)
    adapter.apply(p, "app", None)
    assert (p._ostaf_xyz_lambda, p._ostaf_xyz_adapter) == (0.5, "app")
    assert "Traceback" not in capsys.readouterr().out


def test_no_xyz_script_is_not_an_error(glue):
    glue.fakes["modules.scripts"].scripts_data = []
    glue.fakes["modules.script_callbacks"].registered["before_ui"][0]()  # nothing raised
