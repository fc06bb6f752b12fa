"""``<ostaf:name:λ>`` prompt tags and the ``OSTAF: name:λ (hash), …`` infotext field.

Host-agnostic: A1111 and Forge hand the tag's arguments over already split on ``:`` (their
``ExtraNetworkParams.items``); this module turns them into :class:`AdapterRequest`s and
formats / parses what goes into the image's generation parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import InputError
from .offsets import check_lambda

NETWORK = "ostaf"  # the extra-network name: <ostaf:...>
INFOTEXT_KEY = "OSTAF"
# Same shape as the WebUI's extra-network regex, restricted to our network name.
TAG_RE = re.compile(r"<ostaf:([^>]+)>", re.IGNORECASE)
_INFOTEXT_ENTRY = re.compile(
    r"^\s*(?P<name>[^:,]+?)\s*:\s*(?P<weight>[^\s,()]+)\s*(?:\((?P<hash>[0-9a-fA-F]{1,64})\))?\s*$"
)


@dataclass(frozen=True)
class AdapterRequest:
    """One adapter asked for: by a tag, by the script's accordion or by an X/Y/Z axis."""

    name: str
    weight: float | None  # None: the file's preferred weight
    source: str = "tag"  # "tag" | "ui" | "xyz"


def request_from_items(items: Sequence[str], source: str = "tag") -> AdapterRequest:
    """``["name"]`` or ``["name", "0.8"]`` (a tag's arguments) → request; InputError if bad."""
    parts = [str(x).strip() for x in items]
    shown = "<ostaf:" + ":".join(parts) + ">"
    if not parts or not parts[0]:
        raise InputError(f"{shown}: the tag needs an adapter name, e.g. <ostaf:my_style:0.8>")
    if len(parts) > 2:
        raise InputError(f"{shown}: expected <ostaf:name> or <ostaf:name:λ>")
    weight = None
    if len(parts) == 2 and parts[1]:
        try:
            weight = check_lambda(parts[1])
        except InputError:
            raise InputError(f"{shown}: λ must be a number, got {parts[1]!r}") from None
    return AdapterRequest(parts[0], weight, source)


def find_tags(text: str) -> list[str]:
    """The raw argument strings of every ``<ostaf:…>`` tag in ``text``."""
    return [m.group(1) for m in TAG_RE.finditer(text or "")]


def strip_tags(text: str) -> tuple[str, list[str]]:
    """``text`` without its ``<ostaf:…>`` tags, and the tags removed (verbatim)."""
    removed: list[str] = []

    def cut(m: re.Match[str]) -> str:
        removed.append(m.group(0))
        return ""

    return TAG_RE.sub(cut, text or ""), removed


def format_weight(weight: float) -> str:
    """λ as short text: 1 → "1", 0.75 → "0.75", 1/3 → "0.3333"."""
    text = f"{float(weight):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def format_tag(name: str, weight: float | None = None) -> str:
    return f"<ostaf:{name}>" if weight is None else f"<ostaf:{name}:{format_weight(weight)}>"


def format_infotext(entries: Iterable[tuple[str, float, str | None]]) -> str:
    """``[(name, λ, short hash)]`` → ``"name:λ (hash), name2:λ2 (hash2)"``."""
    out = []
    for name, weight, short in entries:
        item = f"{name}:{format_weight(weight)}"
        out.append(f"{item} ({short})" if short else item)
    return ", ".join(out)


def parse_infotext(text: str) -> list[tuple[str, float, str | None]]:
    """Inverse of :func:`format_infotext`; malformed entries are skipped."""
    out: list[tuple[str, float, str | None]] = []
    for part in (text or "").split(","):
        m = _INFOTEXT_ENTRY.match(part)
        if not m:
            continue
        try:
            weight = check_lambda(m["weight"])
        except InputError:
            continue
        out.append((m["name"], weight, m["hash"].lower() if m["hash"] else None))
    return out


def tag_names(prompt: str) -> set[str]:
    """Names of the adapters that ``prompt`` mentions in tags (bad tags ignored)."""
    names = set()
    for raw in find_tags(prompt):
        try:
            names.add(request_from_items(raw.split(":")).name)
        except InputError:
            continue
    return names


def untagged_from_infotext(params: dict[str, object]) -> list[tuple[str, float]]:
    """Adapters listed in an infotext's ``OSTAF`` field but not as tags in its prompt.

    Those were picked in the script's accordion; pasting them back there (and not the
    tagged ones, which the pasted prompt already applies) reproduces the image.
    """
    listed = parse_infotext(str(params.get(INFOTEXT_KEY, "") or ""))
    tagged = tag_names(str(params.get("Prompt", "") or ""))
    return [(name, weight) for name, weight, _ in listed if name not in tagged]


def strip_negative_tags(p: object) -> list[str]:
    """Remove ``<ostaf:…>`` from a WebUI job's negative prompts (they apply nothing there).

    Works on A1111/Forge ``StableDiffusionProcessing`` objects after ``setup_prompts``;
    returns one warning per distinct tag removed.
    """
    removed: list[str] = []
    for attr in ("all_negative_prompts", "all_hr_negative_prompts"):
        prompts = getattr(p, attr, None)
        if not isinstance(prompts, list):
            continue
        for i, text in enumerate(prompts):
            clean, tags = strip_tags(text)
            if tags:
                prompts[i] = clean
                removed += [t for t in tags if t not in removed]
    if isinstance(getattr(p, "negative_prompt", None), str):
        p.negative_prompt = strip_tags(p.negative_prompt)[0]  # type: ignore[attr-defined]
    return [
        f"OSTAF: {tag} in the negative prompt is ignored (adapters apply from the prompt only)."
        for tag in removed
    ]
