"""Batch training from a manifest: validation, static split per rank, resume, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib_ostaf.batch import ManifestError, job_config, main, read_manifest
from lib_ostaf.files.adapter_file import load_adapter

ROOT = Path(__file__).resolve().parents[1]


def _manifest(tmp_path, reference_image, n=3, **extra):
    lines = [
        json.dumps(
            {
                "image": str(reference_image),
                "attribute": "style",
                "name": f"job{i}",
                "steps": 2,
                "n_views": 2,
                "seed": i,
                **extra,
            }
        )
        for i in range(n)
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_and_jsonl_rows_become_configs(tmp_path, reference_image):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(
        "image,attribute,name,steps,rank,include_mid,lr\nref.png,shape,a,5,2,true,0.001\n"
    )
    rows = read_manifest(csv_path)
    assert rows[0]["image"] == tmp_path / "ref.png" and rows[0]["line"] == 2
    config = job_config(rows[0])
    assert (config.steps, config.rank, config.include_mid, config.lr) == (5, 2, True, 0.001)


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"image": "x", "attribute": "shape"}', "missing name"),
        ('{"image": "x", "attribute": "shape", "name": "../up"}', "name"),
        ('{"image": "x", "attribute": "hue", "name": "a"}', "attribute"),
        ('{"image": "x", "attribute": "shape", "name": "a", "rank": "four"}', "rank"),
        ('{"image": "x", "attribute": "shape", "name": "a", "colour": 1}', "unknown column"),
        ("not json", "not JSON"),
    ],
)
def test_bad_rows_name_their_line(tmp_path, line, match):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "x", "attribute": "shape", "name": "ok"}\n' + line + "\n")
    with pytest.raises(ManifestError, match=match):
        [job_config(r) for r in read_manifest(path)]


def test_duplicate_names_refused(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "x", "attribute": "shape", "name": "a"}\n' * 2)
    with pytest.raises(ManifestError, match="repeats line 1"):
        read_manifest(path)


def test_rank_split_and_resume(tmp_path, reference_image, monkeypatch, capsys):
    manifest = _manifest(tmp_path, reference_image)
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([str(manifest), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["job1.safetensors"]
    monkeypatch.setenv("RANK", "0")
    assert main([str(manifest), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"job{i}.safetensors" for i in range(3)
    ]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert main([str(manifest), "--out", str(out)]) == 0  # resume: nothing to do
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    report = [json.loads(x) for x in (out / "batch_report.rank0.jsonl").read_text().splitlines()]
    assert [r["status"].split()[0] for r in report] == ["done", "done", "skipped", "skipped"]
    # same name, other settings: refused without --overwrite, file kept
    changed = _manifest(tmp_path, reference_image, n=1, rank=2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main([str(changed), "--out", str(out)]) == 1
    assert load_adapter(out / "job0.safetensors").rank == 4


def test_torchrun_two_processes(tmp_path, reference_image):
    manifest = _manifest(tmp_path, reference_image, n=2)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "lib_ostaf.batch",
        str(manifest),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = {}
    for r in (0, 1):
        for entry in map(
            json.loads, (out / f"batch_report.rank{r}.jsonl").read_text().splitlines()
        ):
            ranks[entry["name"]] = entry["rank"]
    assert ranks == {"job0": 0, "job1": 1}  # one job per rank
    assert all(load_adapter(out / f"job{i}.safetensors").rank == 4 for i in range(2))
