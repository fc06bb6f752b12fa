"""Train many adapters from a manifest, one job per rank of an existing launcher.

    torchrun --nproc_per_node 4 -m lib_ostaf.batch manifest.jsonl --out adapters/
    accelerate launch --num_processes 4 -m lib_ostaf.batch manifest.jsonl --out adapters/
    python -m lib_ostaf.batch manifest.csv --out adapters/          # one process

The manifest is JSONL (one object per line) or CSV (a header row) with the columns
``image, attribute, name`` and optionally any :class:`~lib_ostaf.method.train.AttributeConfig`
field (``steps, rank, lr, seed, token, prompt, network, include_mid, default_lambda``).
Relative image paths are relative to the manifest. Rank ``r`` of ``n`` (``RANK`` /
``WORLD_SIZE`` as set by torchrun and accelerate) trains jobs ``r, r+n, r+2n, …`` — a static
split, no scheduler of our own. A job whose adapter already exists with the same settings
is skipped, so a killed run resumes where it stopped (files are written atomically, so an
existing file is a finished one). Each rank writes ``batch_report.rank<r>.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from lib_ostaf.errors import OstafError
from lib_ostaf.files.adapter_file import load_adapter
from lib_ostaf.files.filenames import validate_name
from lib_ostaf.hosts.devices import DTYPES
from lib_ostaf.method.train import AttributeConfig, settings_record

REQUIRED = ("image", "attribute", "name")
_FIELDS = {f.name: f for f in fields(AttributeConfig)}
_INT_FIELDS = {"steps", "rank", "seed", "n_views", "code_dim", "hidden", "preview_every"}
_FLOAT_FIELDS = {"lr", "default_lambda"}
_BOOL_FIELDS = {"include_mid"}
_STR_FIELDS = {"attribute", "token", "prompt", "network"}


class ManifestError(OstafError, ValueError):
    """A manifest row is malformed; the message names the line."""


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows as dicts with ``line`` (1-based) and ``image`` resolved against the manifest."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    text = path.read_text(encoding="utf-8")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        for i, row in enumerate(csv.DictReader(text.splitlines()), start=2):
            rows.append({"line": i, **{k.strip(): v.strip() for k, v in row.items() if k and v}})
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path.name}:{i}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path.name}:{i}: each line must be a JSON object")
            rows.append({"line": i, **row})
    names: dict[str, int] = {}
    for row in rows:
        where = f"{path.name}:{row['line']}"
        missing = [k for k in REQUIRED if not row.get(k)]
        if missing:
            raise ManifestError(f"{where}: missing {', '.join(missing)}")
        unknown = set(row) - set(REQUIRED) - set(_FIELDS) - {"line", "method"}
        if unknown:
            raise ManifestError(f"{where}: unknown column(s) {', '.join(sorted(unknown))}")
        if row.get("method", "attribute") != "attribute":
            raise ManifestError(
                f"{where}: method {row['method']!r} is not supported in batches yet"
            )
        try:
            validate_name(str(row["name"]))
        except OstafError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        if row["name"] in names:
            raise ManifestError(f"{where}: name {row['name']!r} repeats line {names[row['name']]}")
        names[row["name"]] = row["line"]
        image = Path(str(row["image"]))
        row["image"] = image if image.is_absolute() else path.parent / image
    return rows


def job_config(row: dict[str, Any]) -> AttributeConfig:
    """The row's settings as a validated AttributeConfig (CSV strings are converted)."""
    kwargs: dict[str, Any] = {}
    for key, value in row.items():
        if key not in _FIELDS:
            continue
        try:
            if key in _INT_FIELDS:
                value = int(value)
            elif key in _FLOAT_FIELDS:
                value = float(value)
            elif key in _BOOL_FIELDS and isinstance(value, str):
                value = value.lower() in ("1", "true", "yes")
            elif key not in _STR_FIELDS:
                raise ManifestError(f"line {row['line']}: column {key!r} cannot be set here")
        except (TypeError, ValueError):
            raise ManifestError(f"line {row['line']}: {key} = {value!r} is not valid") from None
        kwargs[key] = value
    try:
        return AttributeConfig(**kwargs)
    except OstafError as exc:
        raise ManifestError(f"line {row['line']}: {exc}") from None


def is_done(out_dir: Path, name: str, config: AttributeConfig) -> bool:
    """True when ``<name>.safetensors`` exists and was trained with the same settings."""
    path = out_dir / f"{name}.safetensors"
    if not path.exists():
        return False
    try:
        stored = json.loads(load_adapter(path).metadata.get("ostaf.training", "{}"))
    except (OstafError, json.JSONDecodeError):
        return False
    wanted = json.loads(json.dumps(settings_record(config)))  # tuples → lists, as stored
    return all(stored.get(k) == v for k, v in wanted.items())


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torchrun / accelerate environment variables; (0, 1) alone."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ManifestError(f"bad launcher environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world


def device_for_rank(spec: str = "auto"):
    """This rank's device: under ``auto`` its own GPU (``cuda:<LOCAL_RANK mod count>``),
    else MPS, else the CPU; a named device as named
    (:func:`lib_ostaf.hosts.devices.choose_device`)."""
    from lib_ostaf.hosts.devices import choose_device

    return choose_device(spec, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def run(
    manifest: Path,
    out_dir: Path,
    model: str | None,
    overwrite: bool,
    *,
    device: str = "auto",
    dtype: str = "auto",
    resolution: int | None = None,
) -> int:
    from lib_ostaf.hosts.devices import check_resolution, choose_dtype
    from lib_ostaf.hosts.diffusers_host import DiffusersHost, is_tiny
    from lib_ostaf.method.train import export, train_attribute

    where = device_for_rank(device)  # bad device / dtype / resolution: refused before any work
    choose_dtype(dtype, where)
    check_resolution(resolution)
    # "auto" keeps the embedded tiny models on the CPU, as DiffusersHost.load does
    placed = "auto" if device == "auto" and is_tiny(model) else where
    rows = read_manifest(manifest)
    configs = [job_config(row) for row in rows]  # validate every row before any work
    rank, world = rank_and_world()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / f"batch_report.rank{rank}.jsonl"
    mine = list(range(rank, len(rows), world))
    host = None
    failed = 0
    with report.open("a", encoding="utf-8") as log:
        for i in mine:
            row, config = rows[i], configs[i]
            entry: dict[str, Any] = {"name": row["name"], "line": row["line"], "rank": rank}
            started = time.perf_counter()
            exists = (out_dir / f"{row['name']}.safetensors").exists()
            if exists and not overwrite and is_done(out_dir, row["name"], config):
                entry["status"] = "skipped (already trained with these settings)"
            elif exists and not overwrite:
                failed += 1
                entry |= {"status": "failed", "error": "exists with other settings; --overwrite"}
            else:
                # no adapter yet: sidecars left by a killed run are orphans and are replaced
                try:
                    host = host or DiffusersHost.load(
                        model, device=placed, dtype=dtype, resolution=resolution
                    )
                    result = train_attribute(host, row["image"], config)
                    path = export(result, out_dir, row["name"], overwrite=True)
                    entry |= {
                        "status": "done",
                        "file": path.name,
                        "loss_probe": [result.probe_loss_before, result.probe_loss_after],
                    }
                except OstafError as exc:
                    failed += 1
                    entry |= {"status": "failed", "error": str(exc)}
            entry["seconds"] = round(time.perf_counter() - started, 2)
            log.write(json.dumps(entry) + "\n")
            log.flush()
            print(f"[rank {rank}/{world}] {row['name']}: {entry['status']}", flush=True)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib_ostaf.batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--out", type=Path, default=Path("ostaf_adapters"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--overwrite", action="store_true", help="retrain finished jobs too")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (each rank its own GPU, else MPS, else CPU), cuda, cuda:N, mps or cpu",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: half on a GPU, fp32 on the CPU"
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="training size in pixels (default: native)"
    )
    args = parser.parse_args(argv)
    try:
        return run(
            args.manifest,
            args.out,
            args.model,
            args.overwrite,
            device=args.device,
            dtype=args.dtype,
            resolution=args.resolution,
        )
    except OstafError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
