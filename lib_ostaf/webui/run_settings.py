"""What every training run in a WebUI shares besides the method's own settings (training
size, files, previews, λ sweep), each default written once, in :data:`RUN`. The method's
settings and their defaults are :class:`~lib_ostaf.method.train.AttributeConfig` and
:class:`~lib_ostaf.method.objects.ObjectConfig`; requests, API bodies, CLI flags and the tab
take theirs from those and from here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from lib_ostaf.errors import InputError
from lib_ostaf.method.offsets import check_lambda

MAX_SWEEP = 8


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


@dataclass(kw_only=True)
class RunRequest:
    """The part of a WebUI request (TrainRequest, ObjectRequest) that every run shares."""

    resolution: int = RUN.resolution
    overwrite: bool = RUN.overwrite
    save_state: bool = RUN.save_state
    preview_steps: int = RUN.preview_steps
    preview_size: int = RUN.preview_size
    guidance: float = RUN.guidance
    sweep: tuple[float, ...] = RUN.sweep
    kind: ClassVar[str] = "run"  # the request's name in errors

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """``cls(**data)``, InputError naming unknown keys."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"unknown {cls.kind} settings: {', '.join(unknown)}")
        return cls(**data)

    def check_run_settings(self) -> None:
        """Training size, previews and λ sweep (raises InputError)."""
        resolution = self.resolution
        if isinstance(resolution, bool) or not 0 <= int(resolution) <= 4096:
            raise InputError(f"resolution must be 0 (native) or 64…4096, got {resolution!r}")
        if resolution and (int(resolution) < 64 or int(resolution) % 8):
            raise InputError(f"resolution must be a multiple of 8 and ≥ 64, got {resolution}")
        if not 0 <= int(self.preview_size) <= 4096 or int(self.preview_size) % 8:
            raise InputError("preview size must be 0 (training size) or a multiple of 8")
        if not 1 <= int(self.preview_steps) <= 150:
            raise InputError("preview steps must be in 1…150")
        if len(self.sweep) > MAX_SWEEP:
            raise InputError(f"at most {MAX_SWEEP} λ values in the sweep")
        for lam in self.sweep:
            check_lambda(lam)
