"""What every training run in a WebUI shares besides the method's own settings (training
size, files, previews, λ sweep), each default written once, in :data:`RUN`. The method's
settings and their defaults are :class:`~lib_ostaf.method.train.AttributeConfig` and
:class:`~lib_ostaf.method.objects.ObjectConfig`; requests, API bodies, CLI flags and the tab
take theirs from those and from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunSettings:
    resolution: int = 0  # training size in pixels; 0 = the model's native size
    overwrite: bool = False  # replace an adapter of the same name
    save_state: bool = False  # also write <name>.ostaf-state (hypernetwork parameters)
    preview_steps: int = 12  # sampling steps of a live preview
    preview_size: int = 0  # 0 = the training size
    guidance: float = 5.0  # classifier-free guidance of previews and the sweep
    sweep: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)  # λ values of the result strip
    tab_preview_every: int = 50  # the tab's live preview every N steps (API and CLI: off)


RUN = RunSettings()
