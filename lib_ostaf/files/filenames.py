"""Adapter file names: the file suffixes and the check that makes an output name safe."""

from __future__ import annotations

import unicodedata

from lib_ostaf.errors import InputError

ADAPTER_SUFFIX = ".safetensors"
STATE_SUFFIX = ".ostaf-state"
CARD_SUFFIX = ".json"
PREVIEW_SUFFIX = ".preview.png"

NAME_MAX_LEN = 100
_NAME_PUNCT = set(" -_.()+")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{p}{i}" for p in ("COM", "LPT") for i in range(10)
}


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe output name (file stem), else raise InputError."""
    allowed = "letters, digits, spaces and - _ . ( ) +"
    if not isinstance(name, str):
        raise InputError(f"Adapter name must be text, got {type(name).__name__}.")
    if not name or not name.strip():
        raise InputError(f"Adapter name is empty; use 1-{NAME_MAX_LEN} characters: {allowed}.")
    if len(name) > NAME_MAX_LEN:
        raise InputError(f"Adapter name is {len(name)} characters long; at most {NAME_MAX_LEN}.")
    if "/" in name or "\\" in name:
        raise InputError(f"Adapter name {name!r} contains a path separator; allowed: {allowed}.")
    if ".." in name:
        raise InputError(f"Adapter name {name!r} contains '..'; allowed: {allowed}.")
    if name.startswith("."):
        raise InputError(f"Adapter name {name!r} starts with '.'; it would be a hidden file.")
    if name != name.strip():
        raise InputError(f"Adapter name {name!r} starts or ends with a space.")
    for ch in name:
        if unicodedata.category(ch).startswith("C"):
            raise InputError(
                f"Adapter name {name!r} contains a control character "
                f"(U+{ord(ch):04X}); allowed: {allowed}."
            )
        if not (unicodedata.category(ch)[0] in "LM" or ch.isdecimal() or ch in _NAME_PUNCT):
            raise InputError(f"Adapter name {name!r} contains {ch!r}; allowed: {allowed}.")
    if name.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        raise InputError(f"Adapter name {name!r} is reserved by Windows; choose another.")
    return name
