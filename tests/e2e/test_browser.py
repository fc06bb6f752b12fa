"""Browser test of the OSTAF tab in a REAL WebUI: open the tab, train a few steps, see the
WebUI's progress bar and the live preview, then the result card.

Skipped unless ``OSTAF_WEBUI_URL`` is set and Playwright can drive a Chromium
(``OSTAF_CHROMIUM`` = the browser binary, default /usr/bin/chromium).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

URL = os.environ.get("OSTAF_WEBUI_URL", "").rstrip("/")
CHROMIUM = os.environ.get("OSTAF_CHROMIUM", "/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not URL, reason="set OSTAF_WEBUI_URL to run against a real WebUI"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
]
REFERENCE = Path(__file__).resolve().parents[2] / "lib_ostaf" / "assets" / "reference.png"
MINUTES = 60_000


def _options(values: dict | None = None) -> dict:
    data = None if values is None else json.dumps(values).encode()
    req = urllib.request.Request(
        URL + "/sdapi/v1/options", data, {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture()
def fast_settings():
    keys = ("ostaf_preview_steps", "ostaf_sweep", "live_previews_enable")
    saved = {k: v for k, v in _options().items() if k in keys}
    _options({"ostaf_preview_steps": 2, "ostaf_sweep": "0, 1", "live_previews_enable": True})
    yield
    _options(saved)


def test_tab_trains_with_progress_bar_and_preview(fast_settings, tmp_path):
    name = f"browser_{uuid.uuid4().hex[:6]}"
    with playwright.sync_playwright() as pw:
        browser, page = _open(pw, height=1000)
        _click_ostaf(page, MAIN_TABS)
        page.locator("#ostaf_image input[type=file]").set_input_files(
            str(REFERENCE), timeout=5 * MINUTES
        )  # a loaded machine can take minutes to render the tab
        page.locator("#ostaf_name textarea, #ostaf_name input").first.fill(name)
        page.locator("#ostaf_steps input").first.fill("3")
        _advanced_64px_preview_every_step(page, "ostaf")
        page.screenshot(path=str(tmp_path / "before.png"))
        _train_until_live_preview(page, "ostaf")
        page.screenshot(path=str(tmp_path / "training.png"))
        gallery = page.locator("#ostaf_gallery")
        assert "Live preview" in gallery.inner_text()  # the box has a label
        result = page.locator("#ostaf_result .ostaf-result")
        texts = _progress_texts_until(page, result, 20 * MINUTES)
        # the progress bar covers the λ sweep after the training steps, with its own label
        assert any("OSTAF training: step" in t for t in texts), texts
        assert any("λ sweep" in t for t in texts), texts
        assert name in result.inner_text()
        assert "KiB" in result.inner_text()
        # at the end the progress text is cleared (it kept the last poll's "image 0/2")
        info = page.locator("#ostaf_textinfo").first
        deadline = time.time() + 60
        while info.inner_text().strip() and time.time() < deadline:
            time.sleep(0.5)
        assert info.inner_text().strip() == ""
        # the λ-sweep strip is shown whole, not cropped to its middle: "contain" (ours), or
        # "scale-down" (the WebUI's own style.css on every gallery's thumbnails); never "cover"
        gallery.locator("img").first.wait_for(timeout=MINUTES)
        fits = gallery.locator("img").evaluate_all(
            "els => els.map(e => getComputedStyle(e).objectFit)"
        )
        assert fits and set(fits) <= {"contain", "scale-down"}, fits
        page.screenshot(path=str(tmp_path / "done.png"), full_page=True)
        _keep_screenshots(tmp_path)
        browser.close()


def test_object_tab_trains_with_automatic_masks(fast_settings, tmp_path):
    """Object implantation sub-tab: image, one object (token + class), automatic masks shown
    for checking, then Train → progress bar, live preview, result card."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[:64, :64]
    pixels = np.full((64, 64, 3), 225, np.uint8)
    pixels[(x - 30) ** 2 + (y - 34) ** 2 < 15**2] = (200, 30, 30)
    image = tmp_path / "disc.png"
    Image.fromarray(pixels).save(image)
    name = f"browser_obj_{uuid.uuid4().hex[:6]}"
    # the random test checkpoint's CLIP has no final LayerNorm bias: see test_a1111.py
    emphasis = _options().get("emphasis", "Original")
    _options({"emphasis": "No norm"})
    try:
        with playwright.sync_playwright() as pw:
            browser, page = _open(pw, height=1400)
            _click_ostaf(page, MAIN_TABS)
            sub = page.locator("#ostaf_tabs button").filter(has_text="Object implantation")
            sub.first.click()
            page.locator("#ostaf_obj_image input[type=file]").set_input_files(str(image))
            page.locator("#ostaf_obj_image img").first.wait_for(timeout=MINUTES)  # uploaded
            page.locator("#ostaf_obj_name textarea, #ostaf_obj_name input").first.fill(name)
            page.locator("#ostaf_obj_class_0 textarea, #ostaf_obj_class_0 input").first.fill("toy")
            page.locator("#ostaf_obj_auto").click()
            page.locator("#ostaf_obj_gallery img").first.wait_for(timeout=5 * MINUTES)
            page.screenshot(path=str(tmp_path / "obj_masks.png"))
            page.locator("#ostaf_obj_steps input").first.fill("2")
            page.locator("#ostaf_obj_esteps input").first.fill("1")
            _advanced_64px_preview_every_step(page, "ostaf_obj")
            _train_until_live_preview(page, "ostaf_obj")
            page.screenshot(path=str(tmp_path / "obj_training.png"))
            result = page.locator("#ostaf_obj_result .ostaf-result")
            result.wait_for(timeout=20 * MINUTES)
            assert name in result.inner_text() and "KiB" in result.inner_text()
            page.screenshot(path=str(tmp_path / "obj_done.png"), full_page=True)
            _keep_screenshots(tmp_path)
            browser.close()
    finally:
        _options({"emphasis": emphasis})


def test_card_click_inserts_the_tag(tmp_path):
    names = [a["name"] for a in _get("/ostaf/v1/adapters")["adapters"] if not a["error"]]
    if not names:
        pytest.skip("no adapter in the server's folder yet (run test_a1111.py first)")
    with playwright.sync_playwright() as pw:
        browser, page = _open(pw, height=1000)
        _click_ostaf(page, "#txt2img_extra_tabs > .tab-nav > button")
        card = page.locator("#txt2img_ostaf_cards_html .card").first
        card.wait_for(timeout=MINUTES)
        assert "[attribute]" in card.inner_text() or "ostaf-badge" in card.inner_html()
        # an object adapter's token folder (<name>.embeddings/) is no folder filter, in the
        # folder buttons nor in the (hidden by default) tree view
        pane = page.locator("#txt2img_ostaf")
        assert ".embeddings" not in pane.inner_html()
        page.screenshot(path=str(tmp_path / "cards.png"))
        card.screenshot(path=str(tmp_path / "card.png"))
        _keep_screenshots(tmp_path)
        card.click()
        prompt = page.locator("#txt2img_prompt textarea").input_value()
        assert re.search(r"<ostaf:[^:>]+:-?[0-9.]+>", prompt), prompt
        browser.close()


MAIN_TABS = "#tabs > .tab-nav > button, #tabs > div > button[role=tab]"  # gradio 3 / 4


def _open(pw, height: int):
    """A headless Chromium on the WebUI's page."""
    browser = pw.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    )
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.goto(URL, timeout=5 * MINUTES)
    return browser, page


def _click_ostaf(page, buttons: str) -> None:
    """Click the button labelled exactly OSTAF among ``buttons`` (a CSS selector)."""
    tabs = page.locator(buttons)
    tabs.filter(has_text=re.compile(r"^\s*OSTAF\s*$")).first.click(timeout=5 * MINUTES)


def _advanced_64px_preview_every_step(page, prefix: str) -> None:
    """Open the Advanced accordion of the sub-tab whose elem_ids start with ``prefix``:
    resolution 64, a preview every step."""
    page.locator(f"#{prefix}_advanced").click()
    page.locator(f"#{prefix}_resolution input").first.fill("64")
    page.locator(f"#{prefix}_preview_every input").first.fill("1")


def _train_until_live_preview(page, prefix: str) -> None:
    """Click Train; wait for the WebUI's own progress bar, then the live preview in our
    gallery."""
    page.locator(f"#{prefix}_train").click()
    page.locator(".progressDiv").first.wait_for(timeout=5 * MINUTES)
    page.locator(f"#{prefix}_gallery .livePreview img").first.wait_for(
        state="attached", timeout=15 * MINUTES
    )


def _progress_texts_until(page, done, timeout_ms: int) -> list[str]:
    """Every distinct text of the WebUI's progress bar until ``done`` is visible."""
    texts: list[str] = []
    deadline = time.time() + timeout_ms / 1000
    while time.time() < deadline and not done.is_visible():
        bar = page.locator(".progressDiv")
        try:
            text = bar.first.inner_text(timeout=1000) if bar.count() else ""
        except playwright.Error:  # the bar went away between count() and inner_text()
            text = ""
        if text and (not texts or texts[-1] != text):
            texts.append(text)
        page.wait_for_timeout(200)
    done.wait_for(timeout=MINUTES)
    return texts


def _keep_screenshots(tmp_path: Path) -> None:
    """Copy this test's PNGs to ``OSTAF_E2E_SCREENSHOTS`` when set."""
    shots = os.environ.get("OSTAF_E2E_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("*.png"):
            (Path(shots) / png.name).write_bytes(png.read_bytes())


def _get(path: str) -> dict:
    with urllib.request.urlopen(URL + path, timeout=60) as r:
        return json.loads(r.read())
