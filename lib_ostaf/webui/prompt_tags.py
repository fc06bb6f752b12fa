"""``<ostaf:name:λ>`` prompt tags and the ``OSTAF: name:λ (hash), …`` infotext field.

Host-agnostic: A1111 and Forge hand the tag's arguments over already split on ``:`` (their
``ExtraNetworkParams.items``); this module turns them into :class:`AdapterRequest`s and
formats / parses what goes into the image's generation parameters.

After the name and the optional λ come the *dials*, ``key=value`` items in any order:
a λ per part (``shape=0.6``, ``appearance=1.2``: :mod:`lib_ostaf.method.parts`) and a step
schedule (``start=0.2``, ``end=0.8``: fractions of the sampling steps). Example:
``<ostaf:cat:1:shape=0.6:appearance=1.2:start=0.2:end=0.8>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lib_ostaf.errors import InputError
from lib_ostaf.method.augment import ATTRIBUTES
from lib_ostaf.method.offsets import check_lambda

NETWORK = "ostaf"  # the extra-network name: <ostaf:...>
INFOTEXT_KEY = "OSTAF"
# Same shape as the WebUI's extra-network regex, restricted to our network name.
TAG_RE = re.compile(r"<ostaf:([^>]+)>", re.IGNORECASE)
_INFOTEXT_ENTRY = re.compile(
    r"^\s*(?P<name>[^:,]+?)\s*:\s*(?P<args>[^\s,()]+)\s*(?:\((?P<hash>[0-9a-fA-F]{1,64})\))?\s*$"
)
SCHEDULE_KEYS = ("start", "end")


@dataclass(frozen=True)
class Dials:
    """What a request sets beyond λ: a λ per part and the steps it acts on."""

    parts: tuple[tuple[str, float], ...] = ()  # (part, λ), in the order given
    start: float = 0.0  # fraction of the sampling steps where the adapter switches on
    end: float = 1.0  # … and off

    @property
    def scheduled(self) -> bool:
        return (self.start, self.end) != (0.0, 1.0)

    def part_weight(self, part: str, default: float) -> float:
        return dict(self.parts).get(part, default)

    @property
    def items(self) -> list[str]:
        """As tag items: ``["shape=0.6", "start=0.2"]`` (defaults left out)."""
        out = [f"{p}={format_weight(w)}" for p, w in self.parts]
        out += [f"start={format_weight(self.start)}"] if self.start != 0.0 else []
        return out + ([f"end={format_weight(self.end)}"] if self.end != 1.0 else [])

    @classmethod
    def parse(cls, items: Sequence[str]) -> Dials:
        """``["shape=0.6", "end=0.8"]`` → Dials; InputError names the bad item."""
        values: dict[str, float] = {}
        for item in items:
            key, eq, value = (x.strip() for x in str(item).partition("="))
            key = key.lower()
            if not eq or key not in (*ATTRIBUTES, *SCHEDULE_KEYS):
                raise InputError(
                    f"{item!r} is not a dial; use part=λ ({', '.join(ATTRIBUTES)}) or "
                    "start=/end= (fractions of the sampling steps)"
                )
            if key in values:
                raise InputError(f"{key} is given twice")
            try:
                values[key] = check_lambda(value)
            except InputError:
                raise InputError(f"{key} must be a number, got {value!r}") from None
        start, end = values.pop("start", 0.0), values.pop("end", 1.0)
        if not 0.0 <= start < end <= 1.0:
            raise InputError(f"start/end must satisfy 0 ≤ start < end ≤ 1, got {start:g}/{end:g}")
        return cls(tuple(values.items()), start, end)


@dataclass(frozen=True)
class AdapterRequest:
    """One adapter asked for: by a tag, by the script's accordion or by an X/Y/Z axis."""

    name: str
    weight: float | None  # None: the file's preferred weight
    source: str = "tag"  # "tag" | "ui" | "xyz"
    dials: Dials = Dials()


def request_from_items(items: Sequence[str], source: str = "tag") -> AdapterRequest:
    """``["name"]``, ``["name", "0.8"]``, ``["name", "0.8", "shape=0.5", "end=0.6"]`` (a tag's
    arguments) → request; InputError if bad."""
    parts = [str(x).strip() for x in items]
    shown = "<ostaf:" + ":".join(parts) + ">"
    if not parts or not parts[0]:
        raise InputError(f"{shown}: the tag needs an adapter name, e.g. <ostaf:my_style:0.8>")
    if "=" in parts[0]:
        raise InputError(f"{shown}: the adapter name comes first, e.g. <ostaf:name:1:shape=0.6>")
    rest = parts[1:]
    weight = None
    if rest and "=" not in rest[0]:
        if rest[0]:
            try:
                weight = check_lambda(rest[0])
            except InputError:
                raise InputError(f"{shown}: λ must be a number, got {rest[0]!r}") from None
        rest = rest[1:]
    try:
        dials = Dials.parse(rest)
    except InputError as e:
        raise InputError(f"{shown}: {e}") from None
    return AdapterRequest(parts[0], weight, source, dials)


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


def format_tag(name: str, weight: float | None = None, dials: Dials = Dials()) -> str:
    items = [name] if weight is None else [name, format_weight(weight)]
    if dials.items and weight is None:
        items.append("")  # <ostaf:name::shape=0.5>: the file's preferred λ, then dials
    return "<ostaf:" + ":".join(items + dials.items) + ">"


def format_infotext(
    entries: Iterable[tuple[str, float, str | None] | tuple[str, float, str | None, Dials]],
) -> str:
    """``[(name, λ, short hash[, dials])]`` → ``"name:λ (hash), name2:λ2:shape=0.5 (hash2)"``."""
    out = []
    for name, weight, short, *rest in entries:
        dials = rest[0] if rest else Dials()
        item = ":".join([name, format_weight(weight), *dials.items])
        out.append(f"{item} ({short})" if short else item)
    return ", ".join(out)


def parse_infotext_dials(text: str) -> list[tuple[str, float, str | None, Dials]]:
    """Inverse of :func:`format_infotext`, dials included; malformed entries are skipped."""
    out: list[tuple[str, float, str | None, Dials]] = []
    for part in (text or "").split(","):
        m = _INFOTEXT_ENTRY.match(part)
        if not m:
            continue
        try:
            req = request_from_items([m["name"], *m["args"].split(":")])
        except InputError:
            continue
        if req.weight is None:
            continue
        out.append((req.name, req.weight, m["hash"].lower() if m["hash"] else None, req.dials))
    return out


def parse_infotext(text: str) -> list[tuple[str, float, str | None]]:
    """``[(name, λ, short hash)]`` of an infotext field (see :func:`parse_infotext_dials`)."""
    return [(name, weight, short) for name, weight, short, _ in parse_infotext_dials(text)]


def tag_names(prompt: str) -> set[str]:
    """Names of the adapters that ``prompt`` mentions in tags (bad tags ignored)."""
    names = set()
    for raw in find_tags(prompt):
        try:
            names.add(request_from_items(raw.split(":")).name)
        except InputError:
            continue
    return names


def untagged_from_infotext(params: dict[str, object]) -> list[tuple[str, float, Dials]]:
    """Adapters listed in an infotext's ``OSTAF`` field but not as tags in its prompt.

    Those were picked in the script's accordion; pasting them back there (and not the
    tagged ones, which the pasted prompt already applies) reproduces the image.
    """
    listed = parse_infotext_dials(str(params.get(INFOTEXT_KEY, "") or ""))
    tagged = tag_names(str(params.get("Prompt", "") or ""))
    return [(name, weight, dials) for name, weight, _, dials in listed if name not in tagged]


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
