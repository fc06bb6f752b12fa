"""Hostile-input-safe ``.safetensors`` reading: the header is checked before safetensors sees it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import safetensors.torch
import torch

from lib_ostaf.errors import AdapterFileError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}

# safetensors dtype tag -> (bytes per element, torch dtype or None if torch lacks it)
_ST_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
    "U64": (8, getattr(torch, "uint64", None)),
    "U32": (4, getattr(torch, "uint32", None)),
    "U16": (2, getattr(torch, "uint16", None)),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
}


@dataclass
class _Header:
    size: int  # bytes of the JSON header (after the 8-byte length)
    metadata: dict[str, str]
    tensors: dict[str, tuple[str, list[int], int, int]]  # name -> (dtype, shape, begin, end)


def _reject_constant(value: str) -> Any:
    raise ValueError(f"non-standard JSON constant {value}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def _read_header(f: IO[bytes], file_size: int, where: str) -> _Header:
    """Validate a safetensors header as strictly as the safetensors library does."""
    n, hdr = _read_json(f, file_size, where)
    metadata = hdr.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterFileError(f"{where}: __metadata__ must map strings to strings.")
    tensors = {name: _tensor_entry(name, info, where) for name, info in hdr.items()}
    _check_data_layout(tensors, file_size - 8 - n, where)
    return _Header(size=n, metadata=metadata, tensors=tensors)


def _read_json(f: IO[bytes], file_size: int, where: str) -> tuple[int, dict[str, Any]]:
    """(header length, header JSON object) from the start of a safetensors file."""
    if file_size < 8:
        raise AdapterFileError(f"{where}: file is {file_size} bytes, too short (truncated?).")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise AdapterFileError(
            f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; "
            "not a safetensors file or corrupted."
        )
    if n > file_size - 8:
        raise AdapterFileError(
            f"{where}: header says {n} bytes but the file has only {file_size - 8} after the "
            "length field (truncated or not a safetensors file)."
        )
    raw = f.read(n)
    if len(raw) != n:
        raise AdapterFileError(f"{where}: file ended inside the header (truncated?).")
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("header does not start with '{'")
        hdr = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterFileError(f"{where}: header is not valid JSON ({e}).") from None
    if not isinstance(hdr, dict):
        raise AdapterFileError(f"{where}: header is not a JSON object.")
    return n, hdr


def _tensor_entry(name: str, info: Any, where: str) -> tuple[str, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, its byte count checked."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFileError(
            f"{where}: tensor {name!r} entry must have exactly dtype, shape, data_offsets."
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _ST_DTYPES or _ST_DTYPES[dtype][1] is None:
        raise AdapterFileError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}.")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise AdapterFileError(f"{where}: tensor {name!r} has an invalid shape {shape!r}.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise AdapterFileError(f"{where}: tensor {name!r} has invalid data_offsets.")
    begin, end = offsets
    nbytes = math.prod(shape) * _ST_DTYPES[dtype][0]
    if end < begin or end - begin != nbytes:
        raise AdapterFileError(
            f"{where}: tensor {name!r} claims {end - begin} bytes but shape {shape} of "
            f"{dtype} needs {nbytes}."
        )
    return dtype, shape, begin, end


def _check_data_layout(
    tensors: dict[str, tuple[str, list[int], int, int]], data_len: int, where: str
) -> None:
    """Data section: tensors back to back from 0, no gap or overlap, exactly filling the file."""
    pos = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: kv[1][2:]):
        if begin != pos:
            problem = "overlaps another tensor" if begin < pos else "leaves a gap"
            raise AdapterFileError(f"{where}: tensor {name!r} {problem} in the data section.")
        pos = end
    if pos != data_len:
        state = "truncated" if pos > data_len else "has trailing bytes"
        raise AdapterFileError(
            f"{where}: data section is {data_len} bytes but the header describes {pos} "
            f"(file {state})."
        )


def open_checked(path: str | Path, suffix: str) -> tuple[Path, _Header]:
    path = Path(path)
    where = str(path)
    sfx = path.suffix.lower()
    if sfx in _PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{where}: only {suffix} files are accepted; pickle files ({sfx}) can run code."
        )
    if not path.name.lower().endswith(suffix):
        raise AdapterFileError(f"{where}: only {suffix} files are accepted.")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(4)
            f.seek(0)
            try:
                header = _read_header(f, size, where)
            except AdapterFileError:
                if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
                    raise AdapterFileError(
                        f"{where}: this looks like a PyTorch pickle/zip file renamed to {suffix}; "
                        "refused because pickle files can run code."
                    ) from None
                raise
    except FileNotFoundError:
        raise AdapterFileError(f"{where}: file not found.") from None
    except IsADirectoryError:
        raise AdapterFileError(f"{where}: is a folder, not a file.") from None
    except OSError as e:
        raise AdapterFileError(f"{where}: cannot read file: {e}") from e
    return path, header


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises several types; report them all the same way
        raise AdapterFileError(f"{path}: safetensors could not read the file: {e}") from e


def check_finite_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            raise AdapterFileError(f"{path}: tensor {name!r} contains NaN or infinite values.")
