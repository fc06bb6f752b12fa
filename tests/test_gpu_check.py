"""bench/gpu_check.py on the CPU with the tiny stand-ins (``--device cpu --tiny``): the JSON
has every key with finite numbers, no machine paths, and the time guard skips and says so.
The real run needs a CUDA GPU (see docs/performance.md)."""

from __future__ import annotations

import json
import math

import pytest

from bench import gpu_check

pytestmark = pytest.mark.usefixtures("one_thread")

CELL_NUMBERS = ("s_per_100_steps", "timed_s", "warmup_s", "predicted_peak_gib")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_tiny_cpu_run_writes_finite_results(tmp_path, capsys):
    out = tmp_path / "results" / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    text = out.read_text(encoding="utf-8")
    data = json.loads(text)
    assert set(data) == {"meta", "cells", "grad_check", "skipped"}
    assert data["skipped"] == []
    meta = data["meta"]
    assert meta["tiny"] is True and meta["device"] == "CPU"
    assert meta["command"] == "python bench/gpu_check.py --device cpu --tiny"
    assert _finite(meta["seconds"])
    # No machine paths: not the repo, not the temp folder, not the interpreter.
    assert str(tmp_path) not in text and str(gpu_check.ROOT) not in text and '"/' not in text

    # Each model at its own size: fp16/bf16 × checkpointing off/on.
    cells = {(c["model"], c["size"], c["dtype"], c["checkpointing"]) for c in data["cells"]}
    assert cells == {
        (m, s, d, k)
        for m, s in (("SD1.5", 512), ("SDXL", 1024))
        for d in ("fp16", "bf16")
        for k in (False, True)
    }
    for c in data["cells"]:
        assert "error" not in c and "skipped" not in c, c
        assert all(_finite(c[k]) for k in CELL_NUMBERS), c
        assert c["timed_steps"] == 2 and c["warmup_steps"] == 1 and c["losses_finite"]
        assert c["target_layers"] > 0
        # The CPU has no allocator statistics: measured peak and ratio are null there.
        assert c["peak_gib"] is None and c["peak_ratio"] is None
        assert (c["loss_scale"] is not None) == (c["dtype"] == "fp16")  # fp16 is scaled

    assert [(g["model"], g["size"]) for g in data["grad_check"]] == [("SD1.5", 512), ("SDXL", 1024)]
    for g in data["grad_check"]:
        for run in ("fp16", "fp16_unscaled", "bf16"):
            assert g[run]["finite"] and _finite(g[run]["rel_error"]), (g["model"], run)
        # Loss scaling is what keeps fp16's gradients close (tests/test_half_precision.py).
        assert g["fp16"]["rel_error"] < 0.01 and g["bf16"]["rel_error"] < 0.03
        assert g["fp16"]["rel_error"] < g["fp16_unscaled"]["rel_error"]
        assert g["fp16"]["zero_fraction"] == 0 and g["fp16"]["loss_scale"] > 1

    printed = capsys.readouterr().out
    assert "s / 100 steps" in printed and "fp16 + loss scaling" in printed


def test_time_guard_skips_and_says_which(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--tiny", "--budget-s", "0", "--out", str(out)])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["cells"] == [] and data["grad_check"] == []
    assert len(data["skipped"]) == 2 * (4 + 1)  # two stages: 4 cells + the gradient check
    assert all("time guard" in s for s in data["skipped"])
    assert "SDXL 1024² bf16 checkpointing on: time guard" in "\n".join(data["skipped"])
    assert "Skipped:" in capsys.readouterr().out


def test_clock_estimates_cells_from_measured_ones():
    clock = gpu_check.Clock(100.0, start=gpu_check.time.perf_counter())
    assert clock.estimate("SDXL", 1024, False, 5) == 0.0  # nothing measured: no estimate
    clock.per_step[("SDXL", 512, False)] = 0.5
    assert clock.estimate("SDXL", 1024, False, 5) == pytest.approx(0.5 * 4 * 5)  # 4× the pixels
    clock.per_step[("SDXL", 1024, False)] = 1.0
    assert clock.estimate("SDXL", 1024, False, 5) == pytest.approx(5.0)
    assert clock.estimate("SDXL", 1024, True, 5) == pytest.approx(1.4 * 5)  # recomputation
    assert clock.estimate("SD1.5", 1024, True, 5) == 0.0
    assert 99.0 < clock.left() <= 100.0
