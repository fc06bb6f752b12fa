"""Which adapters one generation applies, with which λ — decided once, for any WebUI host.

Inputs are the ``<ostaf:…>`` tags of the prompt, the script accordion's picks and the X/Y/Z
overrides; the output is a :class:`Plan`: resolved files and weights plus one message per
problem (unknown name, λ not a number, adapter for another model family, unreadable file).
A problem never stops the generation: the adapter is skipped and the message says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .adapter_file import AdapterFile, sd_version_label
from .errors import OstafError
from .offsets import check_lambda
from .prompt_tags import AdapterRequest, format_infotext, request_from_items
from .registry import AdapterRegistry, preferred_weight

NONE_CHOICE = "None"


@dataclass(frozen=True)
class PlannedAdapter:
    name: str
    adapter: AdapterFile
    weight: float
    short_hash: str

    @property
    def identity(self) -> tuple[object, ...]:
        """Names the file's content: a retrained file of the same name differs."""
        return (*self.adapter.identity, self.short_hash)


@dataclass
class Plan:
    adapters: list[PlannedAdapter] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def infotext(self) -> str:
        return format_infotext((a.name, a.weight, a.short_hash) for a in self.adapters)

    @property
    def key(self) -> tuple[object, ...]:
        return tuple((a.identity, a.weight) for a in self.adapters)


def requests_for(
    tag_items: Sequence[Sequence[str]],
    ui: Sequence[tuple[str, object]] = (),
    *,
    xyz_adapter: str | None = None,
    xyz_lambda: float | None = None,
) -> tuple[list[AdapterRequest], list[str]]:
    """Parse tags and accordion picks into requests (bad ones become messages)."""
    requests: list[AdapterRequest] = []
    messages: list[str] = []
    for items in tag_items:
        try:
            requests.append(request_from_items(items, "tag"))
        except OstafError as e:
            messages.append(f"OSTAF: {e}; the tag is ignored.")
    for name, weight in ui:
        if not name or name == NONE_CHOICE:
            continue
        try:
            requests.append(AdapterRequest(str(name), check_lambda(weight), "ui"))
        except OstafError as e:
            messages.append(f"OSTAF: {name}: {e}; skipped.")
    if xyz_adapter and xyz_adapter != NONE_CHOICE:
        requests.append(AdapterRequest(xyz_adapter, None, "xyz"))
    if xyz_lambda is not None:
        lam = check_lambda(xyz_lambda)
        requests = [AdapterRequest(r.name, lam, r.source) for r in requests]
    return requests, messages


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
        planned = PlannedAdapter(req.name, adapter, weight, short)
        if req.name in by_name:
            plan.messages.append(f"OSTAF: {req.name} is asked for twice; using λ={weight:g}.")
            plan.adapters[by_name[req.name]] = planned
            continue
        by_name[req.name] = len(plan.adapters)
        plan.adapters.append(planned)
    return plan


def _default_weight(registry: AdapterRegistry, name: str, adapter: AdapterFile) -> float:
    w = preferred_weight(registry.card(name))
    return adapter.default_lambda if w is None else w
