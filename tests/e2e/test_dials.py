"""Per-part λ and the step schedule against a REAL A1111 or Forge (skipped without
``OSTAF_WEBUI_URL``; same server setup as test_a1111.py).

A ``shape+appearance`` adapter is trained through the API, then from the outside:
each part's λ changes the image on its own, ``start=``/``end=`` give images between "on"
and "off", the infotext keeps the dials, and a no-tag image is byte-identical before and
after everything, an interrupted scheduled generation included.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from lib_ostaf.webui.prompt_tags import INFOTEXT_KEY, parse_infotext_dials

from .test_a1111 import GEN, URL, _png_of, call, train, txt2img

pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not URL, reason="set OSTAF_WEBUI_URL to run against a real WebUI"),
]
PROMPT = "a photo of a ostafv object"
STRONG = 30  # random-weight checkpoints need a large λ to move pixels visibly


@pytest.fixture(scope="module")
def baseline():
    return txt2img(PROMPT, steps=4)[0]


@pytest.fixture(scope="module")
def duo(baseline):
    name = f"e2e_duo_{uuid.uuid4().hex[:8]}"
    train(name, attribute="shape+appearance", steps=2, lr=0.01, guidance=1.0)
    entry = {a["name"]: a for a in call("/ostaf/v1/adapters")["adapters"]}[name]
    assert entry["attribute"] == "shape+appearance" and not entry["error"]
    return name


def _img(tag: str) -> tuple[np.ndarray, str]:
    return txt2img(f"{PROMPT} {tag}", steps=4)


def test_each_part_has_its_own_lambda(baseline, duo):
    both, info = _img(f"<ostaf:{duo}:{STRONG}>")
    shape_only, shape_info = _img(f"<ostaf:{duo}:{STRONG}:appearance=0>")
    app_only, _ = _img(f"<ostaf:{duo}:{STRONG}:shape=0>")
    neither, _ = _img(f"<ostaf:{duo}:{STRONG}:shape=0:appearance=0>")
    # every part at 0 merges nothing; the learned token is at λ = 0, i.e. its init word
    # (ostaf.token_init, "object"): the same pixels as that word in the prompt, no tag
    as_word, _ = txt2img(PROMPT.replace("ostafv", "object"), steps=4)
    assert np.array_equal(neither, as_word)
    images = [baseline, both, shape_only, app_only]
    assert len({im.tobytes() for im in images}) == 4
    # the WebUI's own parser (the value is quoted: it holds ':'), then ours
    params = call("/sdapi/v1/png-info", {"image": _png_of(both, info)})["parameters"]
    (entry,) = parse_infotext_dials(params[INFOTEXT_KEY])
    assert entry[0] == duo and entry[1] == STRONG
    params = call("/sdapi/v1/png-info", {"image": _png_of(shape_only, shape_info)})["parameters"]
    (entry,) = parse_infotext_dials(params[INFOTEXT_KEY])
    assert dict(entry[3].parts) == {"appearance": 0.0}  # the dials survive the round trip


def test_schedule_gives_images_between_on_and_off(baseline, duo):
    on, _ = _img(f"<ostaf:{duo}:{STRONG}>")
    late, info = _img(f"<ostaf:{duo}:{STRONG}:start=0.5>")
    early, _ = _img(f"<ostaf:{duo}:{STRONG}:end=0.5>")
    assert len({x.tobytes() for x in (baseline, on, late, early)}) == 4
    assert "start=0.5" in info
    full_window, _ = _img(f"<ostaf:{duo}:{STRONG}:start=0:end=1>")
    assert np.array_equal(full_window, on)  # the whole pass = no schedule


def test_no_tag_image_unchanged_after_dials_and_an_interrupt(baseline, duo):
    slow = {**GEN, "steps": 40}
    body = {"prompt": f"{PROMPT} <ostaf:{duo}:{STRONG}:start=0.1:end=0.9>", **slow}
    done = threading.Event()

    def generate() -> None:
        try:
            call("/sdapi/v1/txt2img", body)
        finally:
            done.set()

    worker = threading.Thread(target=generate)
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and not done.is_set():
        progress = call("/sdapi/v1/progress?skip_current_image=true")
        if progress["state"]["sampling_step"] >= 8:  # inside the window: adapter merged
            call("/sdapi/v1/interrupt", {})
            break
        time.sleep(0.2)
    worker.join(timeout=600)
    again, info = txt2img(PROMPT, steps=4)
    assert INFOTEXT_KEY + ":" not in info
    assert np.array_equal(again, baseline)
