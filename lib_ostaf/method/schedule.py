"""A step schedule: an adapter acts on the sampling steps from ``start`` to ``end``.

``start``/``end`` are fractions of a pass's steps: step ``s`` of ``n`` (0-based) is inside
when ``start ≤ s/n < end``. A hires pass counts its own steps with the same rule. Weights
change only where the active set changes (the *boundaries*), and a host re-merges only the
layers of the adapters that switch (docs/webui.md "Step schedule").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

Item = TypeVar("Item")


def inside(start: float, end: float, step: int, total: int) -> bool:
    """Whether step ``step`` (0-based) of ``total`` lies in [start, end)."""
    if total <= 0:
        return start == 0.0
    return start <= step / total < end


def boundaries(windows: Sequence[tuple[float, float]], total: int) -> list[int]:
    """The steps (> 0) where the active set differs from the step before."""
    inside_at = [tuple(inside(a, b, s, total) for a, b in windows) for s in range(total)]
    return [s for s in range(1, total) if inside_at[s] != inside_at[s - 1]]


class StepSchedule:
    """The planned adapters that are on at each step of a pass; ``at`` reports a change."""

    def __init__(self, adapters: Sequence[Item], windows: Sequence[tuple[float, float]]) -> None:
        self.adapters, self.windows = list(adapters), list(windows)
        self._on: tuple[int, ...] | None = None

    @property
    def scheduled(self) -> bool:
        return any(w != (0.0, 1.0) for w in self.windows)

    def first(self) -> list[Item]:
        """The adapters on at step 0 of any pass (``start`` = 0)."""
        return self._set([i for i, (a, _) in enumerate(self.windows) if a == 0.0])

    def at(self, step: int, total: int) -> list[Item] | None:
        """The adapters on at ``step`` of ``total`` when that differs from the last call's
        set, else None (nothing to re-merge)."""
        on = [i for i, (a, b) in enumerate(self.windows) if inside(a, b, step, total)]
        return None if tuple(on) == self._on else self._set(on)

    def _set(self, on: list[int]) -> list[Item]:
        self._on = tuple(on)
        return [self.adapters[i] for i in on]


def webui_step(sampling_step: int, denoiser_step: int) -> int:
    """The step a WebUI's ``on_cfg_denoiser`` callback is in. Its ``sampling_step`` is the
    last *finished* step (the sampler's callback sets it after each step), so the model
    call of step ``i ≥ 1`` sees ``i - 1``; the denoiser's own call counter tells the very
    first call (0) from the second (≥ 1). On second-order samplers (two calls a step) a
    boundary at step 1 may fall one call early."""
    return sampling_step + (1 if denoiser_step > 0 else 0)
