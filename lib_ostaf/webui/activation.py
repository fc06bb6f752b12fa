"""Which adapters one generation applies, with which λ — decided once, for any WebUI host.

Inputs are the ``<ostaf:…>`` tags of the prompt, the script accordion's picks and the X/Y/Z
overrides; the output is a :class:`Plan`: resolved files and weights plus one message per
problem (unknown name, λ not a number, adapter for another model family, unreadable file).
A problem never stops the generation: the adapter is skipped and the message says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from lib_ostaf.errors import OstafError
from lib_ostaf.files.adapter_file import AdapterFile, LoraModule
from lib_ostaf.files.metadata import sd_version_label
from lib_ostaf.method.offsets import check_lambda
from lib_ostaf.method.parts import part_names, split_by_part, token_weight
from lib_ostaf.webui.prompt_tags import AdapterRequest, Dials, format_infotext, request_from_items
from lib_ostaf.webui.registry import AdapterRegistry, preferred_weight

NONE_CHOICE = "None"
SLOT_WEIGHT = 1.0  # an accordion slot's λ until the user moves it


@dataclass(frozen=True)
class PlannedAdapter:
    name: str
    adapter: AdapterFile
    weight: float  # λ; also the default of every part the dials leave out
    short_hash: str
    dials: Dials = field(default_factory=Dials)

    @property
    def identity(self) -> tuple[object, ...]:
        """Names the file's content: a retrained file of the same name differs."""
        return (*self.adapter.identity, self.short_hash)

    def part_weight(self, part: str) -> float:
        return self.dials.part_weight(part, self.weight)

    def groups(self) -> list[tuple[str, dict[str, LoraModule], float]]:
        """``[(part, {kohya key: module}, λ_part)]``: what to merge, W + Σ λ_part·ΔW_part."""
        return self._groups

    @cached_property
    def _groups(self) -> list[tuple[str, dict[str, LoraModule], float]]:
        # parsed once per plan entry: hosts ask at every step boundary
        return split_by_part(self.adapter, dict(self.dials.parts), self.weight)

    @property
    def split(self) -> bool:
        """True when the parts are weighed apart (else one λ for the whole file)."""
        return any(w != self.weight for _, _, w in self.groups())

    def merges(self) -> list[tuple[str | None, float]]:
        """What a host merges: ``[(None, λ)]`` for the whole file, or ``[(part, λ_part)]``
        (part ``""``: the modules of no recorded part)."""
        if not self.split:
            return [(None, self.weight)]
        return [(part, w) for part, _, w in self.groups()]

    @cached_property
    def token_weight(self) -> float:
        """λ of an attribute's learned token (its appearance/style part's)."""
        return token_weight(self.adapter, self.weight, dict(self.dials.parts))


@dataclass
class Plan:
    adapters: list[PlannedAdapter] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def infotext(self) -> str:
        return format_infotext((a.name, a.weight, a.short_hash, a.dials) for a in self.adapters)

    @property
    def key(self) -> tuple[object, ...]:
        return tuple((a.identity, a.weight, a.dials) for a in self.adapters)


def requests_for(
    tag_items: Sequence[Sequence[str]],
    ui: Sequence[tuple[str, object] | tuple[str, object, str]] = (),
    *,
    xyz_adapter: str | None = None,
    xyz_lambda: float | None = None,
    xyz_parts: Mapping[str, float] | None = None,
) -> tuple[list[AdapterRequest], list[str]]:
    """Parse tags and accordion picks (name, λ[, dials text "shape=0.6:end=0.8"]) into
    requests (bad ones become messages). X/Y/Z values override every request's λ
    (``xyz_lambda``) or one part's λ (``xyz_parts``)."""
    requests: list[AdapterRequest] = []
    messages: list[str] = []
    for items in tag_items:
        try:
            requests.append(request_from_items(items, "tag"))
        except OstafError as e:
            messages.append(f"OSTAF: {e}; the tag is ignored.")
    for name, weight, *dials in ui:
        if not name or name == NONE_CHOICE:
            continue
        try:
            items = [str(name), str(check_lambda(weight))]
            items += [d for d in str(dials[0] if dials else "").split(":") if d.strip()]
            requests.append(request_from_items(items, "ui"))
        except OstafError as e:
            messages.append(f"OSTAF: {name}: {e}; skipped.")
    if xyz_adapter and xyz_adapter != NONE_CHOICE:
        requests.append(AdapterRequest(xyz_adapter, None, "xyz"))
    if xyz_lambda is not None:
        lam = check_lambda(xyz_lambda)
        requests = [replace(r, weight=lam) for r in requests]
    for part, lam in (xyz_parts or {}).items():
        requests = [_with_part(r, part, check_lambda(lam)) for r in requests]
    return requests, messages


def _with_part(request: AdapterRequest, part: str, weight: float) -> AdapterRequest:
    parts = dict(request.dials.parts) | {part: weight}
    return replace(request, dials=replace(request.dials, parts=tuple(parts.items())))


def plan_generation(
    requests: Sequence[AdapterRequest],
    registry: AdapterRegistry,
    model_family: str | None,
    messages: Sequence[str] = (),
) -> Plan:
    """Resolve requests against the adapters folder and the loaded model's family."""
    plan = Plan(messages=list(messages))
    by_name: dict[str, int] = {}
    for req in requests:
        try:
            adapter = registry.load(req.name)
            entry_weight = _default_weight(registry, req.name, adapter)
            short = registry.short_hash(req.name)
        except OstafError as e:
            plan.messages.append(f"OSTAF: {e}; generation continues without it.")
            continue
        if model_family and adapter.family and adapter.family != model_family:
            plan.messages.append(
                f"OSTAF: {req.name} was made for {sd_version_label(adapter.family)} models but "
                f"the loaded model is {sd_version_label(model_family)}; generation continues "
                "without it."
            )
            continue
        weight = entry_weight if req.weight is None else req.weight
        dials, unknown = _known_parts(req.dials, part_names(adapter))
        if unknown:
            plan.messages.append(
                f"OSTAF: {req.name} has no {', '.join(unknown)} part "
                f"(its parts: {', '.join(part_names(adapter)) or 'none recorded'}); ignored."
            )
        planned = PlannedAdapter(req.name, adapter, weight, short, dials)
        if req.name in by_name:
            plan.messages.append(f"OSTAF: {req.name} is asked for twice; using λ={weight:g}.")
            plan.adapters[by_name[req.name]] = planned
            continue
        by_name[req.name] = len(plan.adapters)
        plan.adapters.append(planned)
    return plan


def _known_parts(dials: Dials, parts: Sequence[str]) -> tuple[Dials, list[str]]:
    """``dials`` keeping only the parts the file has, and the names of the others."""
    unknown = [p for p, _ in dials.parts if p not in parts]
    kept = tuple((p, w) for p, w in dials.parts if p in parts)
    return replace(dials, parts=kept), unknown


def _default_weight(registry: AdapterRegistry, name: str, adapter: AdapterFile) -> float:
    w = preferred_weight(registry.card(name))
    return adapter.default_lambda if w is None else w
