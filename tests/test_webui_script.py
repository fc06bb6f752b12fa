"""scripts/ostaf.py itself, loaded with fake ``gradio`` and ``modules`` (no WebUI needed):
registration, the extra network + always-visible script path of one generation, the cards
page, the X/Y/Z axes and the tab's Train function."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from PIL import Image

from lib_ostaf.files.adapter_file import load_adapter
from lib_ostaf.files.naming import inspect_unet, module_name_from_kohya

from .conftest import disc_image, pristine, same_weights
from .webui_fakes import FakeSdModel, fake_script_modules, load_script, make_adapter

ROOT = Path(__file__).resolve().parents[1]


class _Anything:
    """Any gradio component / layout block: accepts everything; instances are recorded."""

    created: ClassVar[list] = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        _Anything.created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *a, **k: None


def _fake_gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")

    def component(name: str) -> type:
        if name.startswith("__"):  # __file__, __path__, …: a real module would lack them too
            raise AttributeError(name)
        return _Anything

    gr.__getattr__ = component  # type: ignore[attr-defined]
    gr.update = lambda **kw: {"__type__": "update", **kw}  # type: ignore[attr-defined]
    return gr


class _Params:
    def __init__(self, items):
        self.items = items


def _fake_modules(tmp_path: Path, sd_model) -> dict[str, types.ModuleType]:
    """:func:`fake_script_modules` with a model, plus what this file checks: A1111's Extra
    Networks page behaviour, the X/Y/Z script's module, ``sd_hijack``."""
    fakes = fake_script_modules(tmp_path)
    fakes["modules.shared"].sd_model = sd_model

    class ExtraNetworksPage:
        def __init__(self, title):
            self.title, self.name = title, title.lower()

        def find_preview(self, path):
            p = Path(path + ".preview.png")
            return f"./thumb?filename={p}" if p.exists() else None

        def search_terms_from_path(self, filename):
            return Path(filename).name

        def get_sort_keys(self, path):
            return {"name": Path(path).name}

        def create_dirs_view_html(self, tabname):  # A1111 1.10: a button per subfolder
            root = Path(self.allowed_directories_for_previews()[0])
            subdirs = sorted(str(d.relative_to(root)) + "/" for d in root.rglob("*") if d.is_dir())
            labels = ["", *subdirs] if subdirs else []
            return "".join(
                f"<button class='lg secondary{' search-all' if not x else ''}' "
                f"onclick='f(event)'>\n        {x or 'all'}\n        </button>\n"
                for x in labels
            )

        def read_user_metadata(self, item):
            card = Path(item["filename"][: -len(".safetensors")] + ".json")
            item["user_metadata"] = json.loads(card.read_text()) if card.exists() else {}
            if "description" in item["user_metadata"]:
                item["description"] = item["user_metadata"]["description"]  # raw, as A1111

    fakes["modules.ui_extra_networks"].ExtraNetworksPage = ExtraNetworksPage

    xyz = types.ModuleType("xyz_grid.py")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, choices=None, **kw):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    xyz.AxisOption, xyz.format_value = AxisOption, lambda p, opt, x: x
    xyz.axis_options = [AxisOption("Seed", int, None)]
    xyz_class = type("Script", (), {"__module__": "xyz_grid.py"})
    fakes["modules.scripts"].scripts_data = [
        types.SimpleNamespace(script_class=xyz_class, module=xyz)
    ]

    sd_hijack = types.ModuleType("modules.sd_hijack")
    sd_hijack.model_hijack = types.SimpleNamespace(
        embedding_db=getattr(sd_model, "embedding_db", None)
    )
    fakes["modules"].sd_hijack = fakes["modules.sd_hijack"] = sd_hijack
    return {**fakes, "gradio": _fake_gradio(), "xyz": xyz}


def _installed_fakes(
    tmp_path: Path, monkeypatch, sd_model
) -> tuple[dict[str, types.ModuleType], types.ModuleType]:
    """:func:`_fake_modules` in ``sys.modules`` for this test; they and the X/Y/Z script's
    module (not installed: the WebUI loads it as a script)."""
    fakes = _fake_modules(tmp_path, sd_model)
    xyz = fakes.pop("xyz")
    for name, mod in fakes.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return fakes, xyz


@pytest.fixture()
def glue(tmp_path, monkeypatch, one_thread):
    sd_model = FakeSdModel()
    fakes, xyz = _installed_fakes(tmp_path, monkeypatch, sd_model)
    for name in ("networks", "network"):  # the built-in Lora disabled: fallback path
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = load_script(ROOT / "scripts" / "ostaf.py")
    module.APPLIER.forget()
    yield types.SimpleNamespace(m=module, fakes=fakes, xyz=xyz, sd_model=sd_model, dir=tmp_path)
    module.APPLIER.reset(sd_model)


def test_callbacks_registrations_and_settings(glue):
    cbs = glue.fakes["modules.script_callbacks"].registered
    assert {k: len(v) for k, v in cbs.items()} == {
        "before_ui": 1,
        "ui_tabs": 1,
        "app_started": 1,
        "model_loaded": 1,
        "script_unloaded": 1,
        "cfg_denoiser": 1,
    }
    assert "ostaf_dir" in glue.fakes["modules.shared"].options_templates
    assert glue.m.REGISTRY.root == glue.dir.absolute()  # --ostaf-dir
    cbs["before_ui"][0]()
    cbs["before_ui"][0]()  # "Reload UI" runs it again: no duplicate axes
    labels = [o.label for o in glue.xyz.axis_options]
    assert labels == [
        "Seed",
        "OSTAF λ",
        "OSTAF adapter",
        "OSTAF λ shape",
        "OSTAF λ appearance",
    ]
    assert [n.name for n in glue.fakes["modules.extra_networks"].registered] == ["ostaf"] * 2
    assert cbs["ui_tabs"][0]()[0][1:] == ("OSTAF", "ostaf")


def _p():
    p = types.SimpleNamespace(
        all_negative_prompts=["<ostaf:app:1> blurry"], extra_generation_params={}, comments=[]
    )
    p.comment = p.comments.append
    return p


def _expected(glue, base, terms):
    info = inspect_unet(glue.sd_model.model.diffusion_model)
    want = {k: v.clone() for k, v in base.items()}
    for name, lam in terms:
        for key, m in load_adapter(glue.dir / f"{name}.safetensors").modules.items():
            w = "model.diffusion_model." + module_name_from_kohya(key, info) + ".weight"
            want[w] = want[w] + lam * m.delta()
    state = glue.sd_model.state_dict()
    return all(torch.allclose(state[k], v, atol=1e-6) for k, v in want.items())


def test_one_generation_through_the_glue(glue):
    unet = glue.sd_model.model.diffusion_model
    make_adapter(glue.dir, "app", unet, seed=1)
    make_adapter(glue.dir, "shp", unet, attribute="shape", seed=2)
    base = pristine(glue.sd_model)
    network, script = glue.m.ExtraNetworkOstaf(), glue.m.OstafScript()
    p = _p()
    script.process(p, True, "shp", 0.5, "", "None", 1.0, "", "None", 1.0, "")  # shp at 0.5
    assert p.all_negative_prompts == [" blurry"] and "negative prompt" in p.comments[0]
    network.activate(p, [_Params(["app", "0.8"]), _Params(["missing"])])
    script.after_extra_networks_activate(p, True, "shp", 0.5)
    assert _expected(glue, base, [("app", 0.8), ("shp", 0.5)])
    text = p.extra_generation_params["OSTAF"]
    assert text.startswith("app:0.8 (") and ", shp:0.5 (" in text
    assert any("missing" in c and "not found" in c for c in p.comments)  # html-escaped
    glue.m._xyz_lambda(p, "2", None)  # X/Y/Z "OSTAF λ" cell
    script.after_extra_networks_activate(p)
    assert _expected(glue, base, [("app", 2.0), ("shp", 2.0)])
    q = _p()  # next job: no tags, accordion off → exact restore, no infotext
    script.process(q, False)
    network.activate(q, [])
    script.after_extra_networks_activate(q)
    assert same_weights(glue.sd_model, base) and "OSTAF" not in q.extra_generation_params
    # pasting p's infotext back: the tagged adapter stays in the prompt, shp goes to the slot
    params = {"Prompt": "cat <ostaf:app:0.8>", "OSTAF": text}
    assert glue.m._paste_enabled(params)["value"] is True
    assert glue.m._paste_slot(0, 0)(params)["value"] == "shp"
    assert glue.m._paste_slot(0, 1)(params)["value"] == 0.5
    assert glue.m._paste_slot(1, 0)(params)["value"] == "None"


def test_parts_through_the_accordion_xyz_and_paste_back(glue):
    unet = glue.sd_model.model.diffusion_model
    make_adapter(glue.dir, "duo", unet, attribute="shape+appearance", seed=3)
    base = pristine(glue.sd_model)
    network, script = glue.m.ExtraNetworkOstaf(), glue.m.OstafScript()
    p = _p()
    script.process(p, True, "duo", 1.0, "shape=0.25:end=0.5", "None", 1.0, "", "None", 1.0, "")
    network.activate(p, [])
    part = {"shape": 0.75}  # the X/Y/Z "OSTAF λ shape" cell overrides the accordion's
    glue.m._xyz_part("shape")(p, "0.75", None)
    script.after_extra_networks_activate(p)
    adapter = load_adapter(glue.dir / "duo.safetensors")
    table = json.loads(adapter.metadata["ostaf.parts"])
    info = inspect_unet(unet)
    want = {k: v.clone() for k, v in base.items()}
    for name, keys in table.items():
        for key in keys:
            w = "model.diffusion_model." + module_name_from_kohya(key, info) + ".weight"
            want[w] = want[w] + part.get(name, 1.0) * adapter.modules[key].delta()
    state = glue.sd_model.state_dict()
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in want.items())
    text = p.extra_generation_params["OSTAF"]
    assert text.startswith("duo:1:shape=0.75:end=0.5 (")
    params = {"Prompt": "cat", "OSTAF": text}
    assert [glue.m._paste_slot(0, f)(params)["value"] for f in range(3)] == [
        "duo",
        1.0,
        "shape=0.75:end=0.5",
    ]
    assert glue.m._paste_slot(1, 2)(params)["value"] == ""


def test_cards_page(glue):
    unet = glue.sd_model.model.diffusion_model
    make_adapter(glue.dir, "app", unet, preferred=0.6, description="<img src=x onerror=alert(1)>")
    page = glue.m.ExtraNetworksPageOstaf()
    items = list(page.list_items())
    assert [i["name"] for i in items] == ["app"]
    item = items[0]
    assert json.loads("[" + item["prompt"].replace(" + ", ",") + "]") == ["<ostaf:app:", "0.6", ">"]
    assert item["description"].startswith("[attribute] [appearance] [SD1]")  # WebUI escapes
    glue.fakes["modules.shared"].opts.extra_networks_card_description_is_html = True
    html_desc = page.create_item("app")["description"]
    assert "<img" not in html_desc and "&lt;img" in html_desc and "ostaf-badge" in html_desc
    assert item["sd_version"] == "SD1" and len(item["shorthash"]) == 12
    assert page.create_item("../escape") is None
    assert page.allowed_directories_for_previews() == [str(glue.dir.absolute())]
    # an object adapter's <name>.embeddings/ holds embeddings, not adapters: no folder button
    (glue.dir / "pair.embeddings").mkdir()
    (glue.dir / "pair.embeddings" / "obj1.safetensors").write_bytes(b"x")
    assert page.create_dirs_view_html("txt2img") == ""
    (glue.dir / "faces").mkdir()
    buttons = page.create_dirs_view_html("txt2img")
    assert "faces/" in buttons and "all" in buttons and "embeddings" not in buttons


def test_tab_train_button(glue):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    args = [
        "task(x)",
        image,
        "appearance",
        "tab_run",
        "ostafv",
        "",
        2,
        2,
        1e-2,
        0,
        "hypernet",
        False,
        ["attn2"],
        ["to_k", "to_v"],
        "",
        1.0,
        64,
        0,
        False,
    ]
    glue.fakes["modules.shared"].opts.ostaf_sweep = "0, 1"
    glue.fakes["modules.shared"].opts.ostaf_preview_steps = 1
    images, log, card = glue.m._train_ui(*args)
    assert "tab_run" in card and "KiB" in card and "wrote" in log, (log, card)
    assert len(images) == 1 and (glue.dir / "tab_run.safetensors").is_file()
    again = glue.m._train_ui(*args)  # same name, no overwrite: refused before training
    assert again[0] == [] and "already exists" in again[2]
    bad = list(args)
    bad[3] = "../../etc/x"
    assert "path separator" in glue.m._train_ui(*bad)[2]
    bad = list(args)
    bad[1] = None
    assert "no reference image" in glue.m._train_ui(*bad)[2]


def _object_args(name, slot0, slot1=("", "", None, None)):
    empty = ("", "", None, None)
    # steps, token-only steps, rank, lr, token lr, class weight, background, seed, λ,
    # size, preview every, overwrite
    rest = [2, 1, 2, 1e-2, 1e-2, 1.0, 0.0, 0, 1.0, 64, 0, False]
    return ["task(x)", disc_image(), name, *slot0, *slot1, *empty, *rest]


def test_object_tab_train_button(glue):
    glue.fakes["modules.shared"].opts.ostaf_sweep = "0, 1"
    glue.fakes["modules.shared"].opts.ostaf_preview_steps = 1
    before = pristine(glue.sd_model)
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    drawn = {"image": disc_image(), "mask": left.convert("RGBA")}  # gradio 3 sketch payload
    images, log, card = glue.m._object_ui(*_object_args("objs", ("<mug1>", "mug", drawn, None)))
    assert "objs" in card and "KiB" in card and "<mug1>" in log, (log, card)
    assert len(images) == 1 and (glue.dir / "objs.safetensors").is_file()
    assert (glue.dir / "objs.embeddings" / "mug1.safetensors").is_file()
    assert not (glue.dir / "objs.mask-mug1.png").exists()  # the drawn mask was used
    assert same_weights(glue.sd_model, before)
    assert glue.sd_model.embedding_db.word_embeddings == {}

    # an empty drawing + no file = automatic mask; a mask for only one of two = refused
    empty = {"image": disc_image(), "mask": Image.new("RGBA", (64, 64))}
    args = _object_args("two", ("<mug1>", "mug", drawn, None), ("<cup2>", "cup", empty, None))
    out = glue.m._object_ui(*args)
    assert out[0] == [] and "no mask for &lt;cup2&gt;" in out[2]
    assert not (glue.dir / "two.safetensors").exists()
    out = glue.m._object_ui(*_object_args("objs", ("<mug1>", "mug", None, None)))
    assert "already exist" in out[2]  # same name, no overwrite: refused before training


def test_object_tab_uses_the_clip_tower_setting(glue):
    from .test_webui_objects_a1111 import _webui_tower

    opts = glue.fakes["modules.shared"].opts
    assert "ostaf_clip_tower" in glue.fakes["modules.shared"].options_templates
    opts.ostaf_sweep, opts.ostaf_preview_steps = "0", 1
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    drawn = {"image": disc_image(), "mask": left.convert("RGBA")}
    opts.ostaf_clip_tower = str(_webui_tower(glue.sd_model, glue.dir / "tower"))
    _, log, card = glue.m._object_ui(*_object_args("proto", ("<mug1>", "mug", drawn, None)))
    assert "prototypical embedding (clip_l) from CLIP image tower" in log, (log, card)
    notes = json.loads((glue.dir / "proto.json").read_text())["notes"]
    assert "prototypical embedding (clip_l)" in notes


def test_auto_masks_button(glue):
    overlays, note, first, *_ = glue.m._auto_masks_ui(disc_image(), "<mug1>", "", "")
    assert len(overlays) == 1 and "check" in note
    mask = first["value"]
    assert mask.size == (64, 64) and mask.getpixel((30, 34)) == 255 and mask.getpixel((2, 2)) == 0
    assert "upload the image first" in glue.m._auto_masks_ui(None, "<mug1>", "", "")[1]


def test_gallery_temp_dir_is_created(glue, tmp_path):
    """Forge Neo's ``save_pil_to_file`` writes gallery images into ``opts.temp_dir`` without
    creating it (its default <data>/tmp does not exist on a fresh install): the tab's
    galleries failed there with FileNotFoundError after a finished training."""
    opts = glue.fakes["modules.shared"].opts
    opts.temp_dir = str(tmp_path / "webui" / "tmp")
    overlays, *_ = glue.m._auto_masks_ui(disc_image(), "<mug1>", "", "")
    assert overlays and (tmp_path / "webui" / "tmp").is_dir()
    opts.temp_dir = ""  # empty: gradio's own cache, nothing to create
    assert glue.m._for_gallery([disc_image()])


def test_tab_labels_do_not_collide_in_ui_config(glue):
    """A1111 saves UI defaults keyed by tab + label (ui-config.json): two components with the
    same label in the OSTAF tab would share one saved value (a real bug: every object slot's
    token box showed the first slot's token)."""
    _Anything.created.clear()
    glue.m._ui_tab()
    labels = [
        c.kwargs["label"]
        for c in _Anything.created
        if "label" in c.kwargs and not vars(c).get("do_not_save_to_config", False)
    ]
    assert len(labels) > 20
    assert len(labels) == len(set(labels)), sorted(x for x in labels if labels.count(x) > 1)


# --------------------------------------------------------------------------- REST routes


class _HTTPException(Exception):
    def __init__(self, status_code, detail=None, headers=None):
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers


class _App:
    """FastAPI's ``add_api_route`` recorded: path → (endpoint, methods, dependencies)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple] = {}

    def add_api_route(self, path, endpoint, methods, dependencies=()):
        self.routes[path] = (endpoint, methods, list(dependencies))


def _mount(glue, monkeypatch, **cmd_opts) -> _App:
    fastapi = types.ModuleType("fastapi")
    fastapi.Depends = lambda fn: ("depends", fn)
    fastapi.HTTPException = _HTTPException
    security = types.ModuleType("fastapi.security")
    security.HTTPBasic = lambda: "basic"
    security.HTTPBasicCredentials = types.SimpleNamespace
    monkeypatch.setitem(sys.modules, "fastapi", fastapi)
    monkeypatch.setitem(sys.modules, "fastapi.security", security)
    for key, value in cmd_opts.items():
        setattr(glue.fakes["modules.shared"].cmd_opts, key, value)
    app = _App()
    (add_routes,) = glue.fakes["modules.script_callbacks"].registered["app_started"]
    add_routes(None, app)
    return app


READ_ROUTES = {"/ostaf/v1/adapters", "/ostaf/v1/adapter", "/ostaf/v1/progress", "/ostaf/v1/refresh"}
WRITE = {"/ostaf/v1/train", "/ostaf/v1/implant", "/ostaf/v1/interrupt"}


def test_training_routes_only_with_api_and_auth_honoured(glue, monkeypatch, capsys):
    app = _mount(glue, monkeypatch)  # no --api: only the read-only routes
    assert set(app.routes) == READ_ROUTES
    assert "/train, /implant, /interrupt not mounted (start the WebUI with --api)" in (
        capsys.readouterr().out
    )
    assert set(_mount(glue, monkeypatch, api=False, nowebui=True).routes) == READ_ROUTES | WRITE
    app = _mount(glue, monkeypatch, nowebui=False, api=True, api_auth="u:p,v:q")
    assert set(app.routes) == READ_ROUTES | WRITE
    assert app.routes["/ostaf/v1/train"][1] == ["POST"]
    deps = {path: deps for path, (_, _, deps) in app.routes.items()}
    assert all(len(d) == 1 for d in deps.values()), deps
    check = deps["/ostaf/v1/interrupt"][0][1]
    assert check(types.SimpleNamespace(username="v", password="q")) is True
    with pytest.raises(_HTTPException) as e:
        check(types.SimpleNamespace(username="v", password="p"))
    assert e.value.status_code == 401


def test_interrupt_stops_our_job_only(glue, monkeypatch):
    """A wrong id is 404 and stops nothing; the right one stops our training through its own
    flag; the WebUI's global interrupt (a user's txt2img) is never called."""
    app = _mount(glue, monkeypatch, api=True)
    state = glue.fakes["modules.shared"].state
    interrupt = app.routes["/ostaf/v1/interrupt"][0]
    calls = []
    monkeypatch.setattr(state, "interrupt", lambda: calls.append("global"))
    monkeypatch.setattr(glue.m.JOBS, "current", None)  # JOBS outlives a UI reload
    with pytest.raises(_HTTPException) as e:  # no job of ours yet
        interrupt("")
    assert e.value.status_code == 404
    glue.m._interrupt_ui()  # our tab's button with no job of ours: nothing happens
    body = glue.m.TrainBody(
        image=_png_b64(), name="rest_run", steps=10_000, rank=2, resolution=64, sweep=[]
    )
    out = app.routes["/ostaf/v1/train"][0](body)
    job = glue.m.JOBS.get(out["job_id"])
    deadline = time.time() + 60
    while job.step < 2 and job.active and time.time() < deadline:
        time.sleep(0.01)
    assert job.status == "running" and job.step >= 2, (job.error, job.log)
    with pytest.raises(_HTTPException) as e:
        interrupt("ostaf-0-wrong")
    assert e.value.status_code == 404
    time.sleep(0.2)
    assert job.status == "running" and not job.stop.is_set()
    assert interrupt(job.id)["id"] == job.id
    while job.active and time.time() < deadline:
        time.sleep(0.01)
    assert job.status == "interrupted" and job.step < 10_000, job.to_json()
    assert calls == [] and not state.interrupted
    assert not (glue.dir / "rest_run.safetensors").exists()
    assert interrupt("")["status"] == "interrupted"  # the last job; nothing else happens
    assert calls == []


def _png_b64() -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_folder_buttons_filter_keeps_other_folders():
    from lib_ostaf.webui.cards import without_folder_buttons

    def button(label, extra=""):
        return f"<button class='lg secondary{extra}' onclick='x(event)'>\n  {label}\n  </button>"

    html = button("all", " search-all") + button("a/b.embeddings/") + button("loras/")
    assert without_folder_buttons(html, ".embeddings") == button("all", " search-all") + button(
        "loras/"
    )
    assert (
        without_folder_buttons(
            button("all", " search-all") + button("x.embeddings/"), ".embeddings"
        )
        == ""
    )
    assert without_folder_buttons(button("loras/"), ".embeddings") == button("loras/")  # as is
