"""Content and file hashes of adapters: kohya sshs, ModelSpec sha256, A1111/addnet."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import safetensors.torch
import torch

from lib_ostaf.errors import AdapterFileError


def sshs_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya's precalculate_safetensors_hashes.

    Serialises in memory with only the ``ss_*`` metadata; model hash = sha256 of the data
    section, legacy hash = sha256 of bytes [0x100000, 0x110000) of the buffer, first 8 hex.
    """
    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    buf = safetensors.torch.save(state, ss_meta)
    n = int.from_bytes(buf[:8], "little")
    model_hash = hashlib.sha256(buf[8 + n :]).hexdigest()
    legacy_hash = hashlib.sha256(buf[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def content_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The metadata keys that name the tensor bytes (header excluded): kohya's
    ``sshs_model_hash`` / ``sshs_legacy_hash`` and ModelSpec's ``modelspec.hash_sha256``
    (``0x`` + the same SHA-256, which is also Civitai's AutoV3)."""
    model_hash, legacy_hash = sshs_hashes(state, metadata)
    return {
        "sshs_model_hash": model_hash,
        "sshs_legacy_hash": legacy_hash,
        "modelspec.hash_sha256": "0x" + model_hash,
    }


def _chunks(f: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def file_hashes(path: str | Path) -> dict[str, str]:
    """``sha256`` of the whole file, ``addnet`` (sha256 of the safetensors data section, as
    A1111/addnet compute it) and ``short`` (first 12 hex of addnet)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise AdapterFileError(f"{path}: file is too short to be safetensors.")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise AdapterFileError(f"{path}: header length exceeds the file (truncated?).")
            whole, addnet = hashlib.sha256(), hashlib.sha256()
            f.seek(0)
            remaining_header = 8 + n
            for chunk in _chunks(f):
                whole.update(chunk)
                if remaining_header >= len(chunk):
                    remaining_header -= len(chunk)
                    continue
                addnet.update(chunk[remaining_header:])
                remaining_header = 0
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot read file: {e}") from e
    a = addnet.hexdigest()
    return {"sha256": whole.hexdigest(), "addnet": a, "short": a[:12]}
