"""One schema per method: each default lives once — in ``AttributeConfig`` /
``ObjectConfig`` (the method) or ``RUN`` (what every WebUI run shares) — and the WebUI
request, the API bodies, the CLI flags and the tab take theirs from there. A default
restated as a literal anywhere else fails here, and so does a derived default that drifted."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from lib_ostaf.method.objects import ObjectConfig
from lib_ostaf.method.train import AttributeConfig
from lib_ostaf.webui import api
from lib_ostaf.webui.object_job import ObjectRequest
from lib_ostaf.webui.run_settings import RUN, RunSettings
from lib_ostaf.webui.training_job import TrainRequest

ROOT = Path(__file__).resolve().parents[1]
# the schemas derived from the configs: module → classes whose field defaults are checked
DERIVED = {
    "lib_ostaf/webui/training_job.py": ("TrainRequest",),
    "lib_ostaf/webui/object_job.py": ("ObjectRequest",),
    "lib_ostaf/webui/run_settings.py": ("RunRequest",),
    "lib_ostaf/webui/api.py": ("RunBody", "TrainBody", "ObjectBody", "ImplantBody"),
}


def _literal(node: ast.expr | None) -> bool:
    """A restated value: a number, string or bool (not None / ... / an empty container),
    or a tuple/list of them; ``Field(<literal>, …)`` counts as its first argument."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Field" and node.args:
        return _literal(node.args[0])
    if isinstance(node, ast.Constant):
        return node.value not in (None, Ellipsis, "", ())
    if isinstance(node, (ast.Tuple, ast.List)):
        return bool(node.elts) and all(isinstance(e, ast.Constant) for e in node.elts)
    return False


def restated_in_classes(source: str, classes: tuple[str, ...]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for item in node.body:
                if (
                    isinstance(item, ast.AnnAssign)
                    and _literal(item.value)
                    and not ast.unparse(item.annotation).startswith("ClassVar")  # not a field
                ):
                    found.append(
                        f"{node.name}.{ast.unparse(item.target)} = {ast.unparse(item.value)}"
                    )
    return found


def restated_in_ui(source: str) -> list[str]:
    """The tab: a component's ``value=`` (or a Checkbox's first argument) and a setting's
    default (``OptionInfo``'s first argument) given as a literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        values = [k.value for k in node.keywords if k.arg == "value"]
        if name in ("Checkbox", "OptionInfo") and node.args:
            values.append(node.args[0])
        found += [f"line {node.lineno}: {name}({ast.unparse(v)})" for v in values if _literal(v)]
    return found


@pytest.mark.parametrize("path", sorted(DERIVED))
def test_no_default_is_restated_in_the_derived_schemas(path):
    assert restated_in_classes((ROOT / path).read_text(), DERIVED[path]) == []


def test_no_default_is_restated_in_the_tab():
    assert restated_in_ui((ROOT / "scripts" / "ostaf.py").read_text()) == []


def test_the_check_catches_a_restated_default():
    source = (
        "class TrainRequest:\n"
        "    steps: int = 400\n"
        "    rank: int = AttributeConfig.rank\n"
        "    lr: float = Field(1e-4, gt=0)\n"
        "    attn: tuple = ('attn1',)\n"
        "    blocks: tuple | None = None\n"
        "    kind: ClassVar[str] = 'training'\n"
    )
    assert restated_in_classes(source, ("TrainRequest",)) == [
        "TrainRequest.steps = 400",
        "TrainRequest.lr = Field(0.0001, gt=0)",
        "TrainRequest.attn = ('attn1',)",
    ]
    ui = "gr.Number(value=400)\ngr.Number(value=ATTR.steps)\ngr.Checkbox(False, label='x')\n"
    assert restated_in_ui(ui) == ["line 1: Number(400)", "line 3: Checkbox(False)"]


def _defaults(cls) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, f in fields.items():
        if f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
    return out


def _body_defaults(model) -> dict:
    fields = getattr(model, "model_fields", None) or model.__fields__  # pydantic v2 / v1
    out = {}
    for name, f in fields.items():
        factory = getattr(f, "default_factory", None)
        out[name] = factory() if factory is not None else f.default
    return out


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b


@pytest.mark.parametrize(
    ("config", "request_cls", "body"),
    [
        (AttributeConfig, TrainRequest, api.TrainBody),
        (ObjectConfig, ObjectRequest, api.ImplantBody),
    ],
)
def test_derived_defaults_equal_their_source(config, request_cls, body):
    method, run = _defaults(config), _defaults(RunSettings)
    req, bod = _defaults(request_cls), _body_defaults(body)
    for name, value in req.items():
        source = method.get(name, run.get(name, value))
        assert _same(value, source), (request_cls.__name__, name, value, source)
    for name, value in bod.items():
        if name in req and value is not None:
            assert _same(value, req[name]), (body.__name__, name, value, req[name])
    assert set(run) - {"tab_preview_every"} <= set(req)


def test_cli_flags_take_the_configs_defaults():
    """The CLI's training flags default to None: the config fills them in."""
    from lib_ostaf.cli import _parser

    parser = _parser()
    train = parser.parse_args(["train", "--image", "x.png", "--attribute", "shape", "--name", "n"])
    implant = parser.parse_args(["implant", "--image", "x.png", "--name", "n"])
    for args, config in ((train, AttributeConfig), (implant, ObjectConfig)):
        shared = [k for k in vars(args) if k in _defaults(config) and k != "attribute"]
        assert shared and all(getattr(args, k) in (None, []) for k in shared), {
            k: getattr(args, k) for k in shared
        }


def test_run_defaults_cannot_be_changed_at_run_time():
    """RUN is the one home of the shared defaults: frozen, its sweep a tuple (immutable)."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        RUN.resolution = 512  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        RUN.sweep = (1.0,)  # type: ignore[misc]
    assert isinstance(RUN.sweep, tuple) and RunSettings() == RUN
