"""Device and dtype choice (lib_ostaf.hosts.devices) with CUDA / MPS faked present or absent, and
the CLI, batch and DiffusersHost.load wired to it (--device, --dtype, --resolution)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lib_ostaf import batch, cli
from lib_ostaf.errors import InputError
from lib_ostaf.hosts.devices import check_resolution, choose_device, choose_dtype
from lib_ostaf.hosts.diffusers_host import DiffusersHost


@pytest.fixture()
def machine(monkeypatch):
    """``machine(cuda=n, mps=bool, bf16=bool)`` fakes what torch reports."""

    def fake(cuda: int = 0, mps: bool = False, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return fake


@pytest.mark.parametrize(
    ("cuda", "mps", "want"),
    [(2, True, "cuda:0"), (0, True, "mps"), (0, False, "cpu"), (1, False, "cuda:0")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, want):
    machine(cuda=cuda, mps=mps)
    assert choose_device("auto") == torch.device(want)
    assert choose_device(None) == torch.device(want)


def test_auto_gives_each_rank_its_gpu(machine):
    machine(cuda=2)
    assert [choose_device("auto", local_rank=r) for r in range(3)] == [
        torch.device("cuda", i) for i in (0, 1, 0)
    ]
    assert choose_device("cuda:1", local_rank=0) == torch.device("cuda", 1)  # named: as named


def test_named_devices(machine):
    machine(cuda=2, mps=True)
    assert choose_device("cuda") == torch.device("cuda", 0)
    assert choose_device("CUDA:1") == torch.device("cuda", 1)
    assert choose_device("mps") == torch.device("mps")
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(InputError, match="only 2 CUDA"):
        choose_device("cuda:2")
    for bad in ("gpu", "cuda:x", "tpu", "cuda:-1"):
        with pytest.raises(InputError, match="auto, cuda, cuda:N, mps, cpu"):
            choose_device(bad)


def test_a_missing_device_is_refused_not_replaced(machine):
    machine(cuda=0, mps=False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        choose_device("cuda")
    with pytest.raises(InputError, match="MPS"):
        choose_device("mps")


@pytest.mark.parametrize(
    ("device", "bf16", "want"),
    [
        ("cuda", True, torch.bfloat16),
        ("cuda", False, torch.float16),  # e.g. T4, V100, RTX 20xx
        ("mps", True, torch.float16),
        ("cpu", True, torch.float32),
    ],
)
def test_auto_dtype_is_half_on_a_gpu_fp32_on_cpu(machine, device, bf16, want):
    machine(cuda=1, mps=True, bf16=bf16)
    assert choose_dtype("auto", torch.device(device)) == want
    assert choose_dtype(None, torch.device(device)) == want


def test_named_dtypes():
    cpu = torch.device("cpu")
    assert choose_dtype("fp16", cpu) == torch.float16
    assert choose_dtype("BF16", cpu) == torch.bfloat16
    assert choose_dtype("fp32", cpu) == torch.float32
    assert choose_dtype(torch.float16, cpu) == torch.float16
    for bad in ("half", "fp8", torch.int8):
        with pytest.raises(InputError, match="dtype must be one of"):
            choose_dtype(bad, cpu)


def test_resolution_rule():
    assert check_resolution(None) is None and check_resolution(0) is None
    assert check_resolution(512) == 512 and check_resolution(200) == 200
    for bad in (60, 100, 5000, 512.0, True, "512"):
        with pytest.raises(InputError, match="resolution"):
            check_resolution(bad)


def test_load_places_and_sizes_the_model(machine):
    host = DiffusersHost.load("tiny-sd1", device="cpu", dtype="bf16", resolution=256)
    assert host.device == torch.device("cpu") and host.dtype == torch.bfloat16
    assert {p.dtype for p in host.unet.parameters()} == {torch.bfloat16}
    assert host.resolution == 256
    assert host.encode_image(Image.new("RGB", (200, 150))).shape[-1] == 256 // 8
    machine(cuda=1)  # a GPU is "present": the embedded tiny models still stay on the CPU
    tiny = DiffusersHost.load("tiny-sd1")
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    assert tiny.resolution == 128
    with pytest.raises(InputError, match="resolution"):
        DiffusersHost.load("tiny-sd1", resolution=100)


def test_cli_and_batch_refuse_a_missing_device(machine, tmp_path, reference_image, capsys):
    machine(cuda=0, mps=False)
    argv = ["train", "--image", str(reference_image), "--attribute", "appearance"]
    code = cli.main([*argv, "--name", "x", "--out", str(tmp_path), "--device", "cuda"])
    assert code == 2 and "error: device cuda: no CUDA GPU" in capsys.readouterr().err
    code = cli.main([*argv, "--name", "x", "--out", str(tmp_path), "--resolution", "100"])
    assert code == 2 and "resolution must be a multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*argv, "--name", "x", "--dtype", "fp8"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(f'{{"image": "{reference_image}", "attribute": "shape", "name": "a"}}\n')
    assert batch.main([str(manifest), "--out", str(tmp_path), "--device", "mps"]) == 2
    assert "MPS" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.safetensors"))


def test_cli_passes_device_dtype_resolution(monkeypatch, tmp_path, reference_image):
    seen = {}

    def fake_load(model, **kwargs):
        seen.update(kwargs, model=model)
        raise InputError("stop here")

    monkeypatch.setattr(DiffusersHost, "load", staticmethod(fake_load))
    argv = ["train", "--image", str(reference_image), "--attribute", "shape", "--name", "x"]
    argv += ["--device", "cpu", "--dtype", "fp16", "--resolution", "256", "--model", "tiny-sd1"]
    assert cli.main(argv) == 2
    assert seen == {"model": "tiny-sd1", "device": "cpu", "dtype": "fp16", "resolution": 256}
    assert cli.main(["generate", "--prompt", "p", "--dtype", "bf16"]) == 2
    assert seen["dtype"] == "bf16" and seen["device"] == "auto" and seen["resolution"] is None
