"""Compose across images (bench/compose_benchmark.py): the quick run and the checks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import compose_benchmark as cb

ROOT = Path(__file__).resolve().parents[1]
METRICS = cb.COLUMNS


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run (20 steps, 2 prompts × 1 seed), written to a temporary folder."""
    out = tmp_path_factory.mktemp("compose")
    args = argparse.Namespace(
        samples=1, prompts=2, set=[], quick=True, out=out, picture=out / "compose.png"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny UNet is many times slower on 2 busy threads
    try:
        table, images, refs = cb.compose(args)
    finally:
        torch.set_num_threads(threads)
    cb.write(table, images, refs, args)
    return out, table, images


def test_quick_run_measures_every_condition_with_intervals(quick):
    out, _, _ = quick
    text = (out / "compose_benchmark.json").read_text()
    assert str(out) not in text and str(ROOT) not in text
    saved = json.loads(text)
    assert list(saved["rows"]) == list(cb.CONDITIONS)
    assert saved["settings"]["config"]["steps"] == cb.QUICK_STEPS
    prompts = saved["settings"]["prompts"]
    assert len(prompts) == 2 and all(cb.SHAPE_TOKEN in p and cb.APP_TOKEN in p for p in prompts)
    for row in saved["rows"].values():
        assert row["n"] == 2
        for key in METRICS:
            lo, hi = row[f"{key}_ci"]
            assert lo <= row[key] <= hi
    c = saved["checks"]
    for attr in ("shape", "appearance"):
        assert isinstance(c[attr]["fidelity"]["pass"], bool)
        assert c[attr]["leak"]["tolerance"] == cb.LEAK_TOLERANCE
    table_md = cb.markdown(saved)
    assert all(f"| {k} |" in table_md for k in cb.CONDITIONS) and "n = 2 samples" in table_md
    with Image.open(out / "compose.png") as img:  # refs row + header + 2 prompt rows
        assert img.width >= 4 * 96 and img.height >= 3 * 96


def test_adapters_touch_disjoint_layers_and_both_differs_from_each(quick):
    _, table, images = quick
    m = table["modules"]
    assert m["disjoint"] and m["shared_layers"] == [] and table["checks"]["modules_disjoint"]
    assert m["shape"]["layers"] > 0 and m["appearance"]["layers"] > 0
    assert not set(m["shape"]["blocks"]) & set(m["appearance"]["blocks"])
    assert m["appearance"]["learned_token"] and not m["shape"]["learned_token"]
    diff = {k: float((images["both"] - images[k]).abs().max()) for k in cb.CONDITIONS}
    assert diff["both"] == 0.0
    assert min(diff["base"], diff["shape A only"], diff["appearance B only"]) > 0.05


def _row(fid_shape: float, gram: float, fid_app: float, iou: float) -> dict:
    return {"p_new_shape": fid_shape, "p_new_shape_ci": [fid_shape] * 2, "gram_A": gram,
            "gram_A_ci": [gram] * 2, "p_ref_colour": fid_app, "p_ref_colour_ci": [fid_app] * 2,
            "iou_B": iou, "iou_B_ci": [iou] * 2}  # fmt: skip


def test_checks_keep_fidelity_and_bound_leak():
    rows = {
        "base": _row(0.0, 1.0, 0.0, 0.58),
        "shape A only": _row(0.9, 1.0, 0.0, 0.40),
        "appearance B only": _row(0.0, 1.0, 0.9, 0.60),
        "both": _row(0.75, 0.96, 0.70, 0.64),
    }
    c = cb.checks(rows, disjoint=True)
    assert c["shape"]["fidelity"]["pass"]  # 0.75 ≥ 0.72
    assert not c["appearance"]["fidelity"]["pass"]  # 0.70 < 0.72
    assert c["shape"]["leak"]["pass"]  # Gram fell 0.04 more than alone: within 0.05
    assert c["appearance"]["leak"]["excess"] == pytest.approx(0.04)
    assert not c["pass"]
    rows["both"] = _row(0.75, 0.90, 0.80, 0.66)
    c = cb.checks(rows, disjoint=True)
    assert not c["shape"]["leak"]["pass"] and not c["appearance"]["leak"]["pass"]
