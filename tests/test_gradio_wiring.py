"""The tab's event wiring under the real gradio of each host: 3.41.2 (A1111 1.10) in
``.venv-gradio3`` and 4.40.0 (Forge 2) in ``.venv-gradio4`` (``./run.sh test`` builds both
from requirements-gradio3.txt / requirements-gradio4.txt). Each runs this file as a program
(``python -m tests.test_gradio_wiring``) that builds the real OSTAF tab and the script's
accordion with the fake ``modules.*`` of tests/webui_fakes.py (under gradio 4 also Forge's own
gradio patches, tests/forge_fakes.py), walks every registered event and prints a JSON report.

The rule checked (docs/webui.md): an event's ``inputs`` are the called function's parameters,
one component per parameter, in order. :func:`wiring_problems` reports an event whose input
count differs from the function's positional parameters (a trailing parameter with a default
counts too: gradio would silently pass nothing), or whose component, by its ``elem_id``, is
not the parameter it feeds. The tab's functions are also called with the components' values,
and must return one value per output."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENVS = {
    "gradio3": (ROOT / ".venv-gradio3", "requirements-gradio3.txt", "3.41.2"),
    "gradio4": (ROOT / ".venv-gradio4", "requirements-gradio4.txt", "4.40.0"),
}
# A parameter whose component's elem_id ends in another word (elem_ids are part of the UI:
# CSS, JavaScript and saved defaults use them, so they are not renamed to fit).
ELEM_WORDS = {
    "id_task": "dummy",
    "tokens": "token",
    "cls": "class",
    "drawn": "draw",
    "upload": "mask",
    "embedding_steps": "esteps",
    "embedding_lr": "elr",
    "background_weight": "bg",
}
TAB_EVENTS = {  # the functions the OSTAF tab and accordion call, with how often
    "_train_ui": 1,
    "_object_ui": 1,
    "_auto_masks_ui": 1,
    "_image_to_editors": 1,
    "_interrupt_ui": 2,
    "_refresh_names": 1,
    "_share_ui": 2,
}


# --------------------------------------------------------------------------- the checker


def registered_events(blocks) -> list[tuple]:
    """``(fn, inputs, outputs)`` of every event of ``blocks`` that calls a function: gradio 3
    keeps its ``BlockFunction``s in a list, gradio 4 in a dict by id."""
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    return [(f.fn, list(f.inputs), list(f.outputs)) for f in fns if f.fn is not None]


def _fits(param: str, component) -> bool:
    elem_id = re.sub(r"_\d+$", "", getattr(component, "elem_id", None) or "")
    word = ELEM_WORDS.get(param, param)
    return not elem_id or elem_id == word or elem_id.endswith("_" + word)


def wiring_problems(fn, inputs, expand: dict | None = None) -> list[str]:
    """How ``inputs`` disagree with ``fn``'s signature (``__wrapped__`` followed). A
    ``*args`` parameter takes the rest; ``expand[fn name]`` names its items, else each
    must fit the ``*args`` name itself."""
    name = getattr(fn, "__name__", repr(fn))
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)
    ]
    named = [p.name for p in params if p.kind is not p.VAR_POSITIONAL]
    rest = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
    problems = []
    if len(inputs) < len(named) or (rest is None and len(inputs) > len(named)):
        problems.append(f"{name}: {len(inputs)} inputs for the parameters {named}")
    extra = len(inputs) - len(named)
    names = named + ((expand or {}).get(name) or [rest] * extra if rest else [])
    for i, (param, component) in enumerate(zip(names, inputs, strict=False)):
        if not _fits(param, component):
            problems.append(f"{name}: input {i} is {component.elem_id!r}, parameter {param!r}")
    return problems


def call_problems(fn, inputs, outputs) -> list[str]:
    """``fn`` called with its inputs' current values returns one value per output."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        result = fn(*[getattr(c, "value", None) for c in inputs])
    except Exception as e:
        return [f"{name}: raised {type(e).__name__}: {e}"]
    n = 0 if result is None else len(result) if isinstance(result, list | tuple) else 1
    return [] if n == len(outputs) else [f"{name}: {n} values for {len(outputs)} outputs"]


# --------------------------------------------------------------------------- the probe


def _load_script(folder: Path):
    """scripts/ostaf.py under this process's real gradio, with the fake ``modules.*``."""
    import gradio as gr

    from tests.webui_fakes import fake_script_modules, load_script

    if int(gr.__version__.split(".")[0]) >= 4:  # Forge 2: its host and its gradio patches
        import types

        from tests.forge_fakes import forge_gradio_patches

        if not getattr(gr, "_ostaf_forge_patched", False):
            forge_gradio_patches(gr)
            gr._ostaf_forge_patched = True
        sys.modules["modules_forge"] = types.ModuleType("modules_forge")
        sys.modules["backend.patcher.base"] = types.ModuleType("base")
    sys.modules.update(fake_script_modules(folder))
    return load_script(ROOT / "scripts" / "ostaf.py")


def _build(m) -> list[tuple]:
    """The events of the tab (its own Blocks, as A1111 and Forge build it) and of the
    script's accordion (built inside the txt2img Blocks)."""
    import gradio as gr

    ((tab, _, _),) = m._ui_tab()
    with gr.Blocks(analytics_enabled=False) as txt2img:
        m.OstafScript().ui(False)
    return registered_events(tab) + registered_events(txt2img)


def _object_values(m) -> list[str]:
    """The names of ``_object_ui``'s ``*values``: a slot's four, then _object_settings'."""
    slot = ["token", "cls", "drawn", "upload"]
    return slot * m.OBJECT_SLOTS + list(inspect.signature(m._object_settings).parameters)


def probe_tab(folder: Path) -> dict:
    m = _load_script(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registered = _build(m)
    expand = {"_object_ui": _object_values(m)}
    events, problems = [], []
    for fn, inputs, outputs in registered:
        events.append(fn.__name__)
        problems += wiring_problems(fn, inputs, expand)
        problems += call_problems(fn, inputs, outputs)
    warned = [str(w.message) for w in caught if "unexpected argument" in str(w.message)]
    return {"forge": m.FORGE, "events": events, "problems": problems, "dropped": warned}


def probe_toy() -> list[list[str]]:
    """A Blocks with one right and four wrong wirings of ``pair(first, second)``."""
    import gradio as gr

    def pair(first, second):
        return "one value"

    @functools.wraps(pair)
    def wrapped(*args):  # what the WebUI's wrap_gradio_gpu_call puts between
        return pair(*args)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradio's own warning on a count mismatch
        with gr.Blocks(analytics_enabled=False) as blocks:
            first = gr.Textbox(elem_id="toy_first")
            second = gr.Number(elem_id="toy_second")
            out = gr.Textbox(elem_id="toy_out")
            go = gr.Button(elem_id="toy_go")
            go.click(fn=pair, inputs=[first, second], outputs=[out])  # right
            go.click(fn=pair, inputs=[first], outputs=[out])  # one short
            go.click(fn=pair, inputs=[second, first], outputs=[out])  # swapped
            go.click(fn=wrapped, inputs=[first, second, out], outputs=[out])  # one too many
            go.click(fn=pair, inputs=[first, second], outputs=[out, second])  # outputs
    return [wiring_problems(*e[:2]) + call_problems(*e) for e in registered_events(blocks)]


def probe_drift(folder: Path) -> dict:
    """The real tab with drift put in: a hand-made list that forgot the attribute Train's
    last input, the Object tab's steps and rank swapped, and a new ``_train_ui`` parameter
    that no component feeds."""
    m = _load_script(folder)
    wire = m.wire

    def drifting(fn, components):
        inputs = wire(fn, components)
        if fn is m._train_ui:
            return inputs[:-1]
        if fn is m._object_settings:
            inputs[0], inputs[2] = inputs[2], inputs[0]
        return inputs

    m.wire = drifting
    expand = {"_object_ui": _object_values(m)}
    problems = [p for e in _build(m) for p in wiring_problems(*e[:2], expand)]
    m.wire = wire
    train_ui = m._train_ui
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    more = inspect.Parameter("strength", kind, default=1.0)  # a default does not excuse it
    sig = inspect.signature(train_ui)
    m._train_ui = functools.wraps(train_ui)(lambda *a: train_ui(*a))
    m._train_ui.__signature__ = sig.replace(parameters=[*sig.parameters.values(), more])
    try:
        _build(m)
        error = ""
    except ValueError as e:
        error = str(e)
    return {"problems": problems, "new_parameter": error, "train_params": len(sig.parameters)}


def main() -> None:
    import gradio as gr

    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "gradio": gr.__version__,
            "tab": probe_tab(Path(tmp) / "a"),
            "toy": probe_toy(),
            "drift": probe_drift(Path(tmp) / "b"),
        }
    print(json.dumps(report))


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module", params=sorted(ENVS))
def report(request) -> dict:
    env, requirements, version = ENVS[request.param]
    python = env / "bin" / "python"
    if not python.exists():
        pytest.skip(
            f"{env.name} missing (gradio {version}): './run.sh test' builds it, or "
            f"python3 -m venv {env.name} && {env.name}/bin/pip install -r {requirements}"
        )
    run = subprocess.run(
        [str(python), "-m", "tests.test_gradio_wiring"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["gradio"] == version
    return out


def test_every_event_of_the_tab_matches_its_function(report):
    tab = report["tab"]
    assert tab["problems"] == []
    assert {n: tab["events"].count(n) for n in set(tab["events"])} == TAB_EVENTS
    assert tab["forge"] is report["gradio"].startswith("4.")
    assert tab["dropped"] == []  # no keyword that Forge's gradio 4 patch would drop


def test_the_checker_fails_on_a_mismatch(report):
    right, short, swapped, extra, outputs = report["toy"]
    assert right == []
    assert short[0] == "pair: 1 inputs for the parameters ['first', 'second']"
    assert short[1].startswith("pair: raised TypeError")  # and the call fails
    assert swapped == [
        "pair: input 0 is 'toy_second', parameter 'first'",
        "pair: input 1 is 'toy_first', parameter 'second'",
    ]
    assert extra[0] == "pair: 3 inputs for the parameters ['first', 'second']"
    assert extra[1].startswith("pair: raised TypeError")  # through the wrapper
    assert outputs == ["pair: 1 values for 2 outputs"]


def test_drift_in_the_real_tab_is_caught(report):
    drift = report["drift"]
    n = drift["train_params"]
    assert drift["problems"][0].startswith(f"_train_ui: {n - 1} inputs for the parameters [")
    swapped = [p for p in drift["problems"] if p.startswith("_object_ui")]
    assert len(swapped) == 2 and "'ostaf_obj_rank', parameter 'steps'" in swapped[0]
    assert len(drift["problems"]) == 3, drift["problems"]
    assert "wire(_train_ui): no component for ['strength']" in drift["new_parameter"]


if __name__ == "__main__":
    main()
