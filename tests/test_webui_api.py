"""Jobs (one training at a time) and the REST handlers: validation, refusals, auth."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from lib_ostaf.errors import Interrupted
from lib_ostaf.method.masks import load_mask
from lib_ostaf.webui.api import (
    ApiError,
    ImplantBody,
    OstafApi,
    TrainBody,
    check_basic_auth,
    decode_image,
)
from lib_ostaf.webui.jobs import JobBusy, JobManager
from lib_ostaf.webui.registry import AdapterRegistry


def _png(size=(16, 16)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _wait(job, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while job.active and time.time() < deadline:
        time.sleep(0.01)


def test_second_job_is_refused_until_the_first_ends():
    jobs = JobManager()
    first = jobs.begin()
    with pytest.raises(JobBusy, match="already queued"):
        jobs.begin()
    release = threading.Event()
    jobs.run_in_thread(first, lambda j: release.wait(5) and {"ok": 1})
    time.sleep(0.05)
    with pytest.raises(JobBusy):
        jobs.begin()
    release.set()
    _wait(first)
    assert first.status == "done" and first.result == {"ok": 1}
    assert jobs.begin().id != first.id  # free again


def test_interrupt_and_failures_are_recorded():
    jobs = JobManager()
    job = jobs.begin()

    def train(j):
        for step in range(100):
            if j.stop.is_set():
                raise Interrupted(f"training interrupted at step {step}/100")
            jobs.update(j, step + 1, 100, 0.5)
            if step == 3:
                jobs.interrupt(j.id)
        return {}

    jobs.run(job, train)
    assert job.status == "interrupted" and "step 4/100" in job.error and job.step == 4
    job2 = jobs.begin()
    jobs.run(job2, lambda j: 1 / 0)
    assert job2.status == "failed" and "ZeroDivisionError" in job2.error
    assert job2.to_json()["status"] == "failed"


def test_train_body_validation():
    TrainBody(image=_png(), name="x")
    for bad in (
        {"steps": 0},
        {"rank": 0},
        {"lr": -0.001},
        {"lr": 2},
        {"resolution": -1},
        {"steps": "many"},
        {"n_views": 1000},
    ):
        with pytest.raises(ValidationError):
            TrainBody(image=_png(), name="x", **bad)
    with pytest.raises(ValidationError):
        TrainBody(name="x")  # image required
    # lr 0 or null: each attribute's own default (one table, lib_ostaf.method.train.ATTRIBUTE_LR)
    from lib_ostaf.method.train import ATTRIBUTE_LR
    from lib_ostaf.webui.training_job import TrainRequest

    for lr in (0, None):
        assert TrainBody(image=_png(), name="x", lr=lr).lr == lr
        for attribute, rate in ATTRIBUTE_LR.items():
            request = TrainRequest(image=None, name="x", attribute=attribute, lr=lr)
            assert request.config().lr_ == rate


def test_decode_image():
    assert decode_image("data:image/png;base64," + _png()).size == (16, 16)
    for bad, status in (("", 422), ("!!notbase64", 422), (base64.b64encode(b"text").decode(), 422)):
        with pytest.raises(ApiError) as e:
            decode_image(bad)
        assert e.value.status == status


def _b64(image: Image.Image, fmt: str = "PNG", **options) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return base64.b64encode(buf.getvalue()).decode()


def test_decoded_photos_are_upright_rgb_and_masks_keep_alpha():
    wide = Image.new("RGB", (60, 40), (128, 128, 128))
    wide.paste((230, 20, 20), (0, 0, 12, 12))  # red top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned left, "rotate right to display"
    rotated = _b64(wide.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95)
    image = decode_image(rotated)
    assert image.size == (60, 40) and image.getpixel((3, 3))[0] > 180
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    assert decode_image(_b64(rgba)).getpixel((5, 5)) == (255, 255, 255)  # not black
    sixteen = Image.fromarray(np.linspace(0, 65535, 400).reshape(20, 20).astype(np.uint16))
    grey = np.asarray(decode_image(_b64(sixteen)))[..., 0]
    assert grey.min() == 0 and grey.max() == 255  # rescaled, not clipped at 255
    alpha_mask = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    alpha_mask.paste((0, 0, 0, 255), (0, 0, 8, 16))  # black but opaque: the object
    mask = decode_image(_b64(alpha_mask), mask=True)
    assert load_mask(mask, (16, 16))[:, :8].all() and not load_mask(mask, (16, 16))[:, 8:].any()


def _api(tmp_path, runner=None):
    calls = []

    def run(job, request):
        calls.append(request)
        return {"name": request.name}

    return OstafApi(AdapterRegistry(tmp_path), JobManager(), runner or run), calls


def test_train_route_validates_before_starting(tmp_path):
    api, calls = _api(tmp_path)
    for fields, status in (
        ({"name": "../escape"}, 400),  # a bad name: 400, as docs/webui.md says
        ({"name": "a/b"}, 400),
        ({"name": "CON"}, 400),
        ({"name": "../escape", "image": "nope"}, 400),  # the name is checked first
        ({"name": "ok", "attribute": "colour"}, 422),
        ({"name": "ok", "sweep": [1.0] * 20}, 422),
        ({"name": "ok", "resolution": 100}, 422),
        ({"name": "ok", "image": "nope"}, 422),
    ):
        body = TrainBody(**({"image": _png()} | fields))
        with pytest.raises(ApiError) as e:
            api.train(body)
        assert e.value.status == status, fields
    assert calls == [] and api.jobs.current is None
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(ApiError, match="already exists"):
        api.train(TrainBody(image=_png(), name="taken"))
    out = api.train(TrainBody(image=_png(), name="taken", overwrite=True, steps=3))
    _wait(api.jobs.current)
    assert api.progress(out["job_id"])["status"] == "done"
    assert calls[0].steps == 3 and calls[0].image.size == (16, 16)
    with pytest.raises(ApiError) as e:
        api.progress("other-id")
    assert e.value.status == 404


def test_second_training_via_api_is_409(tmp_path):
    release = threading.Event()
    api, _ = _api(tmp_path, runner=lambda job, req: release.wait(5) and {})
    api.train(TrainBody(image=_png(), name="one"))
    with pytest.raises(ApiError) as e:
        api.train(TrainBody(image=_png(), name="two"))
    assert e.value.status == 409
    assert api.interrupt()["status"] in ("queued", "running")
    release.set()


def test_adapter_route_stays_in_the_folder(tmp_path):
    api, _ = _api(tmp_path)
    for name in ("../x", "/etc/passwd", "a\\b"):
        with pytest.raises(ApiError) as e:
            api.adapter(name)
        assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        api.adapter("missing")
    assert e.value.status == 404
    assert api.list_adapters() == {"folder": str(tmp_path.absolute()), "adapters": []}


def test_basic_auth():
    assert check_basic_auth(None, "", "")
    assert check_basic_auth("u:p,v:q:r", "v", "q:r")
    assert check_basic_auth("u:p", "u", "p")
    assert not check_basic_auth("u:p", "u", "x")
    assert not check_basic_auth("u:p", "", "")


def _mask_png(left: bool) -> str:
    im = Image.new("L", (16, 16), 0)
    im.paste(255, (0, 0, 8, 16) if left else (8, 0, 16, 16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_implant_route_validates_before_starting(tmp_path):
    api, calls = _api(tmp_path)
    one = {"token": "<mug1>", "class_name": "mug", "mask": _mask_png(True)}
    two = {"token": "<cup2>", "class_name": "cup", "mask": _mask_png(False)}
    for fields, status in (
        ({"name": "../escape", "objects": [one]}, 400),
        ({"name": "ok", "objects": [one, {**two, "mask": None}]}, 422),  # a mask for one only
        ({"name": "ok", "objects": [{**one, "token": "a b"}]}, 422),
        ({"name": "ok", "objects": [{**one, "mask": "nope"}]}, 422),
        ({"name": "ok", "objects": [one, {**two, "token": "<MUG1>"}]}, 422),  # duplicate
        ({"name": "ok", "objects": [one], "image": "nope"}, 422),
    ):
        body = ImplantBody(**({"image": _png()} | fields))
        with pytest.raises(ApiError) as e:
            api.implant(body)
        assert e.value.status == status, fields
    for objects in ([], [one] * 5):  # checked by the handler (pydantic v1 has no min_length)
        with pytest.raises(ApiError, match="1…4"):
            api.implant(ImplantBody(image=_png(), name="ok", objects=objects))
    assert calls == [] and api.jobs.current is None and list(tmp_path.iterdir()) == []
    out = api.implant(ImplantBody(image=_png(), name="pair", objects=[one, two], steps=3))
    _wait(api.jobs.current)
    assert api.progress(out["job_id"])["status"] == "done"
    request = calls[0]
    assert request.tokens == ["<mug1>", "<cup2>"] and request.classes == ["mug", "cup"]
    assert [m.getpixel((2, 2)) for m in request.masks] == [255, 0]  # masks keep their mode


def test_interrupt_needs_the_right_job_id(tmp_path):
    release = threading.Event()

    def runner(job, request):
        while not job.stop.is_set() and not release.is_set():
            time.sleep(0.005)
        if job.stop.is_set():
            raise Interrupted("training interrupted at step 1/400")
        return {}

    api, _ = _api(tmp_path, runner=runner)
    with pytest.raises(ApiError) as e:
        api.interrupt()
    assert e.value.status == 404 and e.value.detail == "no training job yet"
    job = api.jobs.get(api.train(TrainBody(image=_png(), name="one"))["job_id"])
    with pytest.raises(ApiError) as e:
        api.interrupt("ostaf-99-0")
    assert e.value.status == 404 and e.value.detail == "no such training job"
    assert not job.stop.is_set() and job.active
    assert api.interrupt(job.id)["id"] == job.id and job.stop.is_set()
    _wait(job)
    assert job.status == "interrupted"
    release.set()
