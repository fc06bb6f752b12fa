"""The standalone CLI end to end on the embedded tiny model, and its errors."""

from __future__ import annotations

import pytest
from PIL import Image

from lib_ostaf.cli import main, resolve_adapter
from lib_ostaf.errors import InputError
from lib_ostaf.files.adapter_file import load_adapter


def _train(tmp_path, reference_image, name="cli", *extra):
    return main(
        [
            "train",
            "--image",
            str(reference_image),
            "--attribute",
            "style",
            "--name",
            name,
            "--out",
            str(tmp_path),
            "--steps",
            "3",
            "--lr",
            "1e-3",
            *extra,
        ]
    )


def test_train_generate_sweep(tmp_path, reference_image, capsys):
    assert _train(tmp_path, reference_image) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "loss on probe set" in out
    adapter = load_adapter(tmp_path / "cli.safetensors")
    assert adapter.metadata["ostaf.attribute"] == "style"

    img = tmp_path / "g.png"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a star",
                "--adapter",
                "cli:0.8",
                "--adapters-dir",
                str(tmp_path),
                "--steps",
                "2",
                "--output",
                str(img),
            ]
        )
        == 0
    )
    assert Image.open(img).size == (128, 128)

    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "sweep",
                "--adapter",
                str(tmp_path / "cli.safetensors"),
                "--prompt",
                "a star",
                "--prompt",
                "a red circle",
                "--lambdas",
                "0,1,2",
                "--steps",
                "2",
                "--output",
                str(grid),
            ]
        )
        == 0
    )
    g = Image.open(grid)
    assert g.size == (3 * 128, 2 * 128 + 14)


def test_existing_output_refused_without_overwrite(tmp_path, reference_image, capsys):
    assert _train(tmp_path, reference_image, "twice") == 0
    before = (tmp_path / "twice.safetensors").read_bytes()
    assert _train(tmp_path, reference_image, "twice", "--seed", "5") == 2
    assert "already exist" in capsys.readouterr().err
    assert (tmp_path / "twice.safetensors").read_bytes() == before
    assert _train(tmp_path, reference_image, "twice", "--seed", "5", "--overwrite") == 0
    assert (tmp_path / "twice.safetensors").read_bytes() != before
    assert not (tmp_path / "twice.ostaf-state").exists()  # the sidecar is opt-in
    assert _train(tmp_path, reference_image, "twice", "--overwrite", "--save-state") == 0
    assert (tmp_path / "twice.ostaf-state").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--name", "a/b"], "name"),
        (["--rank", "0"], "rank"),
        (["--steps", "-3"], "steps"),
    ],
)
def test_bad_train_arguments(tmp_path, reference_image, capsys, argv, message):
    assert _train(tmp_path, reference_image, "ok", *argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.glob("*.safetensors"))


def _crash(*args, **kwargs):
    raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_unexpected_error_is_one_line_unless_debug(
    tmp_path, reference_image, capsys, monkeypatch, debug
):
    from lib_ostaf.hosts.diffusers_host import DiffusersHost

    monkeypatch.setattr(DiffusersHost, "load", _crash)
    assert _train(tmp_path, reference_image, "boom", *debug) == 1
    err = capsys.readouterr().err
    line = "error: internal error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    if debug:
        assert err.startswith("Traceback (most recent call last)") and err.endswith(line)
        assert "in _crash" in err
    else:
        assert err == line  # exactly one line, no traceback
    assert not any(tmp_path.iterdir())


def test_debug_flag_before_the_command_and_expected_errors_stay_code_2(
    tmp_path, reference_image, capsys, monkeypatch
):
    import lib_ostaf.cli as cli

    monkeypatch.setattr(cli, "_run", lambda args: (_ for _ in ()).throw(KeyError("model")))
    assert main(["--debug", "demo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: internal error: KeyError: 'model'\n")
    monkeypatch.setattr(cli, "_run", lambda args: (_ for _ in ()).throw(InputError("bad λ")))
    assert main(["demo", "--out", str(tmp_path), "--debug"]) == 2
    assert capsys.readouterr().err == "error: bad λ\n"  # no traceback, even with --debug


def test_bad_generate_arguments(tmp_path, capsys):
    assert (
        main(["generate", "--prompt", "x", "--adapter", "missing", "--adapters-dir", str(tmp_path)])
        == 2
    )
    assert "not found" in capsys.readouterr().err
    assert (
        main(
            [
                "sweep",
                "--adapter",
                "x",
                "--prompt",
                "p",
                "--lambdas",
                "a,b",
                "--adapters-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "train",
                "--image",
                str(tmp_path / "nope.png"),
                "--attribute",
                "shape",
                "--name",
                "n",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err


def test_adapter_spec_parsing(tmp_path, reference_image):
    assert _train(tmp_path, reference_image, "spec") == 0
    adapter, lam = resolve_adapter("spec", tmp_path)
    assert lam is None and adapter.name == "spec"
    _, lam = resolve_adapter("spec:-0.25", tmp_path)
    assert lam == -0.25
    with pytest.raises(InputError, match="λ"):
        resolve_adapter("spec:abc", tmp_path)


def test_model_folder_round_trip(tmp_path, reference_image, sd1_host):
    """A user's diffusers folder loads through the same path as a real checkpoint."""
    folder = tmp_path / "model"
    sd1_host.pipe.save_pretrained(folder)
    assert (
        main(
            [
                "train",
                "--image",
                str(reference_image),
                "--attribute",
                "shape",
                "--name",
                "f",
                "--out",
                str(tmp_path),
                "--steps",
                "2",
                "--model",
                str(folder),
            ]
        )
        == 0
    )
    assert load_adapter(tmp_path / "f.safetensors").metadata["ostaf.base_model"] == "model"
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--prompt", "x", "--model", str(tmp_path / "empty")]) == 2
