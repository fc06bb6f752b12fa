"""The parts benchmark's checks on made-up rows (the full run is in bench/results/)."""

from __future__ import annotations

from bench.parts_benchmark import DIALS, checks, markdown


def _rows(shape: dict[str, float], colour: dict[str, float]) -> list[dict]:
    rows = []
    for dial, (s, a) in DIALS.items():
        base = {"dial": dial, "shape": s, "appearance": a, "control": 0.5, "gram": 1.0, "iou": 0.5}
        rows.append(base | {"prompts": "shape", "p_new_shape": shape[dial], "p_ref_colour": 0.0})
        rows.append(
            base | {"prompts": "appearance", "p_new_shape": 0.0, "p_ref_colour": colour[dial]}
        )
    return rows


def test_each_dial_must_carry_its_own_attribute():
    good = checks(
        _rows(
            {"none": 0.0, "shape only": 0.9, "appearance only": 0.1, "both": 0.8},
            {"none": 0.0, "shape only": 0.2, "appearance only": 0.9, "both": 0.9},
        )
    )
    assert all(ok for *_, ok in good.values())
    leaky = checks(
        _rows(
            {"none": 0.0, "shape only": 0.9, "appearance only": 0.6, "both": 0.5},
            {"none": 0.0, "shape only": 0.0, "appearance only": 0.0, "both": 0.0},
        )
    )
    oks = [ok for *_, ok in leaky.values()]
    assert oks == [False, False, False, True]  # nothing learned is no pass for the dial
    rows = _rows(dict.fromkeys(DIALS, 0.5), dict.fromkeys(DIALS, 0.5))
    cis = {f"{k}_ci": [0.4, 0.6] for k in ("p_new_shape", "p_ref_colour", "control", "gram", "iou")}
    settings = {"reference": "r", "samples_per_prompt": 4, "prompts_per_set": 12}
    table = {"settings": settings, "rows": [r | cis for r in rows], "checks": good}
    assert markdown(table).count("\n| ") >= len(DIALS) * 2 + len(good)
