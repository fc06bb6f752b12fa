"""The attribute benchmark's measuring code: intervals, label-free metrics, --reference runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import attribute_benchmark as ab
from lib_ostaf.world import attributes as world

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = ab.summarise({"control": list(rng.random(12) < 0.5)})
    large = ab.summarise({"control": list(rng.random(480) < 0.5)})
    for s in (small, large):
        lo, hi = s["control_ci"]
        assert lo <= s["control"] <= hi
    assert small["n"] == 12 and large["n"] == 480
    width = lambda s: s["control_ci"][1] - s["control_ci"][0]  # noqa: E731
    assert width(large) < 0.5 * width(small)
    assert ab.summarise({"control": [1.0] * 5, "p_new_shape": [None] * 5})["p_new_shape_ci"] is None


def test_label_free_metrics_on_clean_world_images():
    spec = world.Spec("moon", "blue", "solid", radius=6.5)
    x = torch.from_numpy(world.grid_array(spec))
    mask = world.render(spec)[1]
    hist = ab.colour_histogram(x, mask)
    assert abs(hist.sum() - 1) < 1e-9 and ab.colour_distance(hist, hist) == 0
    red = torch.from_numpy(world.grid_array(world.with_(spec, colour="red")))
    assert ab.colour_distance(ab.colour_histogram(red, mask), hist) == 1.0  # disjoint colours


def test_checks_follow_the_issue_targets():
    base = {"case": "shape", "method": "base (λ=0)", "lambda": 0.0, "p_new_shape": 0.0,
            "gram": 1.0, "control": 0.5}  # fmt: skip
    rows = [base] + [
        {
            "case": "shape",
            "method": ab.DEFAULT,
            "lambda": lam,
            "p_new_shape": f,
            "gram": 0.98,
            "control": 0.48,
        }
        for lam, f in ((0.5, 0.4), (1.0, 0.85), (1.5, 0.9))
    ]
    rows.append(rows[2] | {"method": "OSTAF hypernet, other part", "p_new_shape": 0.3})
    c = ab.checks(rows)["shape"]
    assert c["fidelity"]["pass"] and c["leak"]["pass"] and c["control"]["pass"]
    assert c["lambda"]["pass"] and c["diagonal"]["pass"]
    rows[-1]["p_new_shape"] = 0.5  # the other part gains more than half as much
    assert not ab.checks(rows)["shape"]["diagonal"]["pass"]


def test_reference_run_writes_the_table_without_machine_paths(tmp_path):
    img = Image.new("RGB", (300, 200), (235, 235, 235))  # not the model's size
    px = img.load()
    for y in range(40, 160):
        for x in range(100, 220):
            px[x, y] = (200, 40, 40) if (x + y) // 12 % 2 else (60, 10, 10)
    ref = tmp_path / "photo.png"
    img.save(ref)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.attribute_benchmark", "--reference", str(ref),
           "--attribute", "appearance", "--samples", "1", "--quick", "--lambdas", "1",
           "--set", "steps=2", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    text = (out / "attribute_benchmark.json").read_text()
    assert str(tmp_path) not in text and str(ROOT) not in text
    table = json.loads(text)
    rows = table["runs"]
    assert [r["method"] for r in rows] == ["base (λ=0)", ab.DEFAULT]
    for r in rows:
        assert r["n"] == 12 and r["p_ref_colour"] is None and r["p_new_shape"] is None
        for key in ("iou", "gram", "colour", "control"):
            lo, hi = r[f"{key}_ci"]
            assert lo <= r[key] <= hi
    assert table["checks"]["appearance"]["fidelity"]["metric"] == "colour"
    assert (out / "attribute_benchmark.md").is_file() and (
        out / "attribute_benchmark.png"
    ).is_file()
