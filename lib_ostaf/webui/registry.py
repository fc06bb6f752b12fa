"""The adapters folder of a WebUI: listing, name → file resolution, caching, path safety.

Every path handed out lies inside the folder: names are checked with
:func:`~lib_ostaf.files.filenames.validate_name` and the resolved path (symlinks followed)
must still be inside the resolved folder. Loaded files are cached by (size, mtime), so a
retrained adapter of the same name is picked up at once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_ostaf.errors import AdapterFileError, InputError, OstafError
from lib_ostaf.files.adapter_file import AdapterFile, load_adapter
from lib_ostaf.files.filenames import ADAPTER_SUFFIX, CARD_SUFFIX, PREVIEW_SUFFIX, validate_name
from lib_ostaf.files.hashes import file_hashes

MAX_CARD_BYTES = 1 << 20


@dataclass
class AdapterEntry:
    """What a card, a dropdown or the API shows about one adapter file."""

    name: str
    path: Path
    size: int
    family: str | None = None
    method: str = ""
    attribute: str = ""
    default_lambda: float = 1.0
    preferred_weight: float | None = None
    description: str = ""
    activation_text: str = ""
    short_hash: str = ""
    preview: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    error: str = ""  # the file could not be read: why

    @property
    def weight(self) -> float:
        """λ a tag without one gets: the card's preferred weight, else the file's default."""
        return self.preferred_weight if self.preferred_weight is not None else self.default_lambda

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "size": self.size,
            "family": self.family,
            "method": self.method,
            "attribute": self.attribute,
            "weight": self.weight,
            "description": self.description,
            "activation_text": self.activation_text,
            "hash": self.short_hash,
            "has_preview": self.preview is not None,
            "error": self.error,
        }


class AdapterRegistry:
    """The adapters in one folder (``root`` may be a callable: settings can change it)."""

    def __init__(self, root: Path | str | Callable[[], Path | str]) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[tuple[int, int], AdapterFile]] = {}
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}

    @property
    def root(self) -> Path:
        root = self._root() if callable(self._root) else self._root
        return Path(root).expanduser().absolute()

    # -- names and paths ------------------------------------------------------------------
    def path_for(self, name: str, suffix: str = ADAPTER_SUFFIX) -> Path:
        """``<root>/<name><suffix>``; InputError for unsafe names or paths leaving the folder."""
        validate_name(name)
        if suffix not in (ADAPTER_SUFFIX, CARD_SUFFIX, PREVIEW_SUFFIX):
            raise InputError(f"unexpected file kind {suffix!r}")
        root = self.root
        path = root / (name + suffix)
        self.check_inside(path)
        return path

    def check_inside(self, path: Path | str) -> Path:
        """``path`` resolved; InputError unless it is inside the adapters folder."""
        root = self.root.resolve()
        resolved = Path(path).resolve()
        if resolved.parent != root and root not in resolved.parents:
            raise InputError(f"{path} is outside the adapters folder {root}; refused.")
        return resolved

    def names(self) -> list[str]:
        """Stems of the ``.safetensors`` files directly in the folder, sorted."""
        root = self.root
        if not root.is_dir():
            return []
        out = []
        for p in root.iterdir():
            if not p.name.endswith(ADAPTER_SUFFIX) or not p.is_file():
                continue
            stem = p.name[: -len(ADAPTER_SUFFIX)]
            try:
                validate_name(stem)
                self.check_inside(p)
            except InputError:
                continue
            out.append(stem)
        return sorted(out, key=str.lower)

    # -- loading --------------------------------------------------------------------------
    def load(self, name: str) -> AdapterFile:
        """The adapter called ``name`` (cached while its file is unchanged)."""
        path = self.path_for(name)
        if not path.is_file():
            raise InputError(f"adapter {name!r} not found in {self.root}")
        key = _stat_key(path)
        with self._lock:
            cached = self._files.get(path)
            if cached and cached[0] == key:
                return cached[1]
        adapter = load_adapter(path)
        with self._lock:
            self._files[path] = (key, adapter)
        return adapter

    def short_hash(self, name: str) -> str:
        """A1111's short (addnet) hash of the file, 12 hex digits; cached."""
        path = self.path_for(name)
        key = _stat_key(path)
        with self._lock:
            cached = self._hashes.get(path)
            if cached and cached[0] == key:
                return cached[1]
        short = file_hashes(path)["short"]
        with self._lock:
            self._hashes[path] = (key, short)
        return short

    def card(self, name: str) -> dict[str, Any]:
        """The ``<name>.json`` card, or {} when missing or unreadable."""
        path = self.path_for(name, CARD_SUFFIX)
        try:
            if not path.is_file() or path.stat().st_size > MAX_CARD_BYTES:
                return {}
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def entry(self, name: str) -> AdapterEntry:
        path = self.path_for(name)
        size = path.stat().st_size if path.exists() else 0
        card = self.card(name)
        preview = self.path_for(name, PREVIEW_SUFFIX)
        entry = AdapterEntry(
            name=name,
            path=path,
            size=size,
            preview=preview if preview.is_file() else None,
            description=str(card.get("description", "") or ""),
            activation_text=str(card.get("activation text", "") or ""),
            preferred_weight=preferred_weight(card),
        )
        try:
            adapter = self.load(name)
            entry.short_hash = self.short_hash(name)
        except (AdapterFileError, InputError, OSError) as e:
            entry.error = str(e)
            return entry
        md = adapter.metadata
        entry.metadata = dict(md)
        entry.family = adapter.family
        entry.method = md.get("ostaf.method", "") or ("lora" if md else "")
        entry.attribute = md.get("ostaf.attribute", "")
        entry.default_lambda = adapter.default_lambda
        return entry

    def entries(self) -> list[AdapterEntry]:
        out = []
        for name in self.names():
            try:
                out.append(self.entry(name))
            except OstafError:
                continue
        return out

    def forget(self) -> None:
        """Drop the caches (after a refresh or a checkpoint change)."""
        with self._lock:
            self._files.clear()
            self._hashes.clear()


def resolve_adapters_dir(flag: str | None, setting: str | None, models_path: str | Path) -> Path:
    """The adapters folder: ``--ostaf-dir`` wins, then the setting, then ``models/ostaf``."""
    for value in (flag, setting):
        if value and str(value).strip():
            return Path(str(value).strip()).expanduser()
    return Path(models_path) / "ostaf"


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def preferred_weight(card: dict[str, Any]) -> float | None:
    """A card's preferred weight; 0 / missing / bad → None (A1111 treats 0 as "unset")."""
    value = card.get("preferred weight")
    try:
        w = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return w if w == w and abs(w) != float("inf") and w != 0 else None
