"""End to end against a REAL AUTOMATIC1111 with this extension installed.

Skipped unless ``OSTAF_WEBUI_URL`` is set (e.g. http://127.0.0.1:7860). Made for the CPU
test server (``--test-server``: random-weight SD1), so images are 64 px and 2 steps.
Optional: ``OSTAF_E2E_LORA_DIR`` = the server's ``models/Lora`` folder on this machine, to
check ``<ostaf:…>`` mixed with ``<lora:…>``.

The strongest check is from the outside: same seed and no tags gives the same pixels
before any activation and after everything (training, tags, Lora, X/Y/Z, accordion).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_ostaf.webui.prompt_tags import INFOTEXT_KEY, parse_infotext

URL = os.environ.get("OSTAF_WEBUI_URL", "").rstrip("/")
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not URL, reason="set OSTAF_WEBUI_URL to run against a real WebUI"),
]
GEN = {
    "steps": 2,
    "width": 64,
    "height": 64,
    "seed": 1234,
    "sampler_name": "Euler",
    "cfg_scale": 5,
    "batch_size": 1,
}
TIMEOUT = float(os.environ.get("OSTAF_E2E_TIMEOUT", "1800"))


def call(path: str, body: dict | None = None, *, method: str | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        URL + path, data, {"content-type": "application/json"}, method=method
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return json.loads(r.read())


def status_of(path: str, body: dict | None = None) -> tuple[int, dict]:
    try:
        return 200, call(path, body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@functools.cache
def server_is_forge() -> bool:
    """Forge's options have ``forge_*`` keys (A1111's never do)."""
    try:
        return URL != "" and any(k.startswith("forge_") for k in call("/sdapi/v1/options"))
    except OSError:
        return False


def txt2img(prompt: str, **extra) -> tuple[np.ndarray, str]:
    r = call("/sdapi/v1/txt2img", {"prompt": prompt, **GEN, **extra})
    image = Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
    return np.asarray(image.convert("RGB")), json.loads(r["info"])["infotexts"][0]


def png_b64(size: int = 64) -> str:
    ref = Path(__file__).resolve().parents[2] / "lib_ostaf" / "assets" / "reference.png"
    buf = io.BytesIO()
    Image.open(ref).convert("RGB").resize((size, size)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def wait_job(job_id: str) -> dict:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        job = call(f"/ostaf/v1/progress?job_id={job_id}")
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(2)
    raise TimeoutError(job_id)


def train_body(name: str, **fields) -> dict:
    """A ``/ostaf/v1/train`` body: the reference image at 64 px, one view, and ``fields``."""
    return {"image": png_b64(), "name": name, "resolution": 64, "n_views": 1, **fields}


def train(name: str, **fields) -> dict:
    """Train through the API (:func:`train_body`) and wait: the job, asserted done."""
    job = wait_job(call("/ostaf/v1/train", train_body(name, **fields))["job_id"])
    assert job["status"] == "done", job
    return job


@pytest.fixture(scope="module")
def baseline():
    """Same seed, no tags — before any OSTAF activation in this module."""
    image, info = txt2img("a photo of a cat")
    assert INFOTEXT_KEY + ":" not in info
    return image


@pytest.fixture(scope="module")
def adapter(baseline):
    name = f"e2e_{uuid.uuid4().hex[:8]}"
    job = train(
        name, steps=2, lr=0.01, sweep=[0, 1], preview_every=1, preview_steps=2, guidance=1.0
    )
    assert job["result"]["layers"] > 0 and job["preview_id"] == 2  # a preview per step
    return {"name": name, "hash": job["result"]["hash"], "job": job}


def test_trained_on_the_loaded_model_and_listed(adapter):
    listed = {a["name"]: a for a in call("/ostaf/v1/adapters")["adapters"]}
    entry = listed[adapter["name"]]
    assert entry["hash"] == adapter["hash"] and entry["family"] == "sd1" and not entry["error"]
    assert entry["has_preview"] and entry["attribute"] == "appearance"


def test_tag_changes_the_image_and_writes_infotext(baseline, adapter):
    image, info = txt2img(f"a photo of a cat <ostaf:{adapter['name']}:30>")
    assert np.abs(image.astype(int) - baseline).mean() > 0.5
    params = call("/sdapi/v1/png-info", {"image": _png_of(image, info)})["parameters"]
    assert parse_infotext(params[INFOTEXT_KEY]) == [(adapter["name"], 30.0, adapter["hash"])]
    # the accordion (always-visible script args) gives the same image without a tag
    ui, ui_info = txt2img(
        "a photo of a cat",
        alwayson_scripts={"ostaf": {"args": [True, *_slots((adapter["name"], 30.0))]}},
    )
    assert np.array_equal(ui, image) and adapter["hash"] in ui_info


def _slots(*picks: tuple[str, float]) -> list:
    """The accordion's slot args: (adapter, λ, dials) × 3, unused slots "None"."""
    picks = [*picks, *[("None", 1.0)] * (3 - len(picks))]
    return [x for name, lam in picks for x in (name, lam, "")]


def test_bad_input_never_stops_generation(baseline, adapter):
    for prompt, negative in (
        ("a photo of a cat <ostaf:no_such_adapter:1>", ""),
        (f"a photo of a cat <ostaf:{adapter['name']}:abc>", ""),
        ("a photo of a cat", f"<ostaf:{adapter['name']}:30>"),  # negative: ignored
    ):
        image, _ = txt2img(prompt, negative_prompt=negative)
        assert np.array_equal(image, baseline), prompt


def test_sdxl_adapter_on_sd1_model_is_skipped(baseline, adapter):
    """A file made for SDXL (metadata says so): clear message, generation goes on without it."""
    from lib_ostaf.files.adapter_file import load_adapter, save_adapter

    src = Path(call(f"/ostaf/v1/adapter?name={adapter['name']}")["path"])
    if not os.access(src.parent, os.W_OK):
        pytest.skip("the server's adapters folder is not on this machine")
    original = load_adapter(src)
    name = adapter["name"] + "_xl"
    md = dict(original.metadata) | {
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    }
    save_adapter(src.parent / f"{name}.safetensors", original.modules, md, overwrite=True)
    listed = {a["name"]: a for a in call("/ostaf/v1/refresh", {})["adapters"]}
    assert listed[name]["family"] == "sdxl"
    image, info = txt2img(f"a photo of a cat <ostaf:{name}:30>")
    assert np.array_equal(image, baseline) and INFOTEXT_KEY + ":" not in info


@pytest.mark.skipif(not os.environ.get("OSTAF_E2E_LORA_DIR"), reason="OSTAF_E2E_LORA_DIR unset")
def test_mixed_with_builtin_lora(baseline, adapter):
    lora_dir = Path(os.environ["OSTAF_E2E_LORA_DIR"])
    src = Path(call(f"/ostaf/v1/adapter?name={adapter['name']}")["path"])
    shutil.copy(src, lora_dir / f"{adapter['name']}_as_lora.safetensors")
    call("/sdapi/v1/refresh-loras", {})
    alias = adapter["name"]  # ss_output_name: Lora refers to it by the alias from the file
    both, info = txt2img(f"a photo of a cat <lora:{alias}:15> <ostaf:{adapter['name']}:15>")
    single, _ = txt2img(f"a photo of a cat <ostaf:{adapter['name']}:30>")
    assert "Lora hashes" in info and INFOTEXT_KEY in info
    assert np.abs(both.astype(int) - single).mean() < 1.0  # 15 + 15 ≈ 30 (float order)
    assert np.abs(both.astype(int) - baseline).mean() > 0.5


def test_xyz_lambda_axis(baseline, adapter):
    scripts = call("/sdapi/v1/script-info")
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = next(a["choices"] for a in xyz["args"] if a["choices"] and "OSTAF λ" in a["choices"])
    assert "OSTAF adapter" in labels
    args = _xyz_args(xyz["args"], labels.index("OSTAF λ"), "0, 30")
    r = call(
        "/sdapi/v1/txt2img",
        {
            "prompt": f"a photo of a cat <ostaf:{adapter['name']}:1>",
            **GEN,
            "script_name": "x/y/z plot",
            "script_args": args,
        },
    )
    images = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in r["images"]
    ]
    cells = [im for im in images if im.shape[:2] == baseline.shape[:2]]
    assert len(cells) == 2
    assert np.array_equal(cells[0], baseline)  # λ = 0 is the identity
    assert not np.array_equal(cells[1], baseline)


def _xyz_args(script_args: list[dict], x_type: int, x_values: str) -> list:
    """The X/Y/Z plot's positional args, by the labels its script-info lists: A1111 1.10
    has 18, Forge Neo adds "Row Count" before the margins. Each axis has a values text box
    then a values dropdown of the same label; other controls keep their defaults."""
    given = {"X type": x_type, "X values": x_values, "Y type": 0, "Y values": ""}
    given |= {"Z type": 0, "Z values": "", "Draw legend": True, "Include Sub Images": True}
    args, seen = [], set()
    for arg in script_args:
        label = arg["label"]
        if label in given and label not in seen:
            args.append(given[label])
            seen.add(label)
        elif label.endswith(" values"):  # the axis's dropdown
            args.append([])
        else:
            args.append(arg["value"])
    return args


def test_second_training_refused_and_interrupt_writes_nothing(adapter):
    name = f"e2e_stop_{uuid.uuid4().hex[:6]}"
    body = train_body(name, steps=500, sweep=[])
    first = call("/ostaf/v1/train", body)
    code, err = status_of("/ostaf/v1/train", body | {"name": name + "_2"})
    assert code == 409, err
    time.sleep(5)
    call("/ostaf/v1/interrupt", {}, method="POST")
    job = wait_job(first["job_id"])
    assert job["status"] == "interrupted", job
    names = {a["name"] for a in call("/ostaf/v1/adapters")["adapters"]}
    assert name not in names
    code, _ = status_of("/ostaf/v1/train", body | {"name": "../escape"})
    assert code == 400  # a bad name, as docs/webui.md says


def test_interrupt_with_a_wrong_job_id_is_404_and_spares_txt2img():
    """Our interrupt stops only our own job: a wrong id is 404 and a running txt2img
    finishes with the same pixels as an uninterrupted one."""
    import threading

    slow = {"steps": 8, "seed": 4321}
    reference, _ = txt2img("a photo of a dog", **slow)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(image=txt2img("a photo of a dog", **slow)))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline and call("/sdapi/v1/progress")["progress"] <= 0:
        time.sleep(0.2)
    code, err = status_of(f"/ostaf/v1/interrupt?job_id=no_such_job_{uuid.uuid4().hex[:4]}", {})
    assert code == 404, err
    assert call("/sdapi/v1/progress")["progress"] > 0  # still generating when refused
    worker.join(TIMEOUT)
    assert np.array_equal(out["image"][0], reference)


def _img2img(prompt: str, init: np.ndarray, **extra) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(init).save(buf, "PNG")
    body = {
        "prompt": prompt,
        **GEN,
        "init_images": [base64.b64encode(buf.getvalue()).decode()],
        "denoising_strength": 0.6,
        **extra,
    }
    r = call("/sdapi/v1/img2img", body)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0]))).convert("RGB"))


def test_hires_batch_and_img2img(baseline, adapter):
    tag = f"<ostaf:{adapter['name']}:30>"
    hires = {
        "enable_hr": True,
        "hr_scale": 2,
        "hr_second_pass_steps": 1,
        "hr_upscaler": "Latent",
        "denoising_strength": 0.5,
    }
    if server_is_forge():  # Forge 2.0.1's API crashes on hires when this is left out
        hires["hr_additional_modules"] = ["Use same choices"]
    plain_hr, _ = txt2img("a photo of a cat", **hires)
    tagged_hr, info = txt2img(f"a photo of a cat {tag}", **hires)
    assert plain_hr.shape == (128, 128, 3) and INFOTEXT_KEY in info
    assert np.abs(tagged_hr.astype(int) - plain_hr).mean() > 0.5
    assert np.array_equal(txt2img("a photo of a cat", **hires)[0], plain_hr)
    r = call("/sdapi/v1/txt2img", {"prompt": f"a photo of a cat {tag}", **GEN, "batch_size": 2})
    batch = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in r["images"]
    ]
    assert len(batch) == 2 and np.abs(batch[0].astype(int) - baseline).mean() > 0.5
    # img2img encodes the init image by *sampling* the VAE posterior with the global RNG, so
    # two identical img2img calls differ slightly: compare against that noise floor.
    plain_i2i = _img2img("a photo of a cat", baseline)
    tagged_i2i = _img2img(f"a photo of a cat {tag}", baseline)
    again_i2i = _img2img("a photo of a cat", baseline)
    floor = np.abs(again_i2i.astype(int) - plain_i2i).mean()
    assert np.abs(tagged_i2i.astype(int) - plain_i2i).mean() > max(0.5, 4 * floor), floor
    assert floor < 2.0


def test_object_implantation_via_api(baseline):
    """Implant an object (a drawn mask) on the loaded model; its token works only while the
    adapter is active, and generation without the tag is untouched."""
    name = f"e2e_obj_{uuid.uuid4().hex[:8]}"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    body = {
        "image": png_b64(),
        "name": name,
        "objects": [
            {
                "token": "<e2eobj>",
                "class_name": "toy",
                "mask": base64.b64encode(buf.getvalue()).decode(),
            }
        ],
        "steps": 2,
        "embedding_steps": 1,
        "lr": 0.001,
        "embedding_lr": 0.01,
        "resolution": 64,
        "sweep": [0, 1],
        "preview_every": 1,
        "preview_steps": 2,
        "guidance": 1.0,
    }
    # The random test checkpoint's CLIP has a zero final LayerNorm bias, so A1111's
    # "Original" emphasis divides mean(z) by mean(z) ≈ 0 and can give NaN for any new
    # vector; real CLIP weights have a bias. "No norm" skips that division.
    emphasis = call("/sdapi/v1/options").get("emphasis", "Original")
    call("/sdapi/v1/options", {"emphasis": "No norm"})
    try:
        _implant_and_generate(body, name)
    finally:
        call("/sdapi/v1/options", {"emphasis": emphasis})
    assert np.array_equal(txt2img("a photo of a cat")[0], baseline)


def _implant_and_generate(body: dict, name: str) -> None:
    status, bad = status_of(
        "/ostaf/v1/implant", body | {"objects": [{"token": "a b", "class_name": "toy"}]}
    )
    assert status == 422 and "one word" in bad["detail"]
    job = wait_job(call("/ostaf/v1/implant", body)["job_id"])
    assert job["status"] == "done", job
    assert job["result"]["tokens"] == ["<e2eobj>"] and job["preview_id"] == 3
    plain, _ = txt2img("a photo of <e2eobj>")
    tagged, info = txt2img(f"a photo of <e2eobj> <ostaf:{name}:1>")
    assert np.abs(tagged.astype(int) - plain).mean() > 0.5 and name in info
    token_only, _ = txt2img(f"a photo of <e2eobj> <ostaf:{name}:0>")  # λ 0: tokens, no LoRA
    assert not np.array_equal(token_only, plain)
    again, _ = txt2img("a photo of <e2eobj>")  # the token is gone with the tag
    assert np.array_equal(again, plain)


def test_zz_weights_restored_after_everything(baseline):
    image, info = txt2img("a photo of a cat")
    assert np.array_equal(image, baseline)
    assert INFOTEXT_KEY + ":" not in info


def _png_of(pixels: np.ndarray, infotext: str) -> str:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", infotext)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode()
