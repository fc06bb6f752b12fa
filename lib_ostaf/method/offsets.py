"""Applying and removing low-rank offsets ``W' = W + λ·ΔW`` on Linear layers.

Two mechanisms, one for each phase:

* :class:`OffsetHooks` — training and previews. A forward hook adds ``λ·B(A x)`` to a
  layer's output; the base weights are never written, so removing the hooks restores
  the model by construction. Factors are swapped in every step by the trainer.
* :class:`WeightPatcher` — generation. Merges ``Σ λ_i ΔW_i`` into the weights once
  (zero per-step cost) and restores the bit-exact backup. Re-applying the same set is a
  no-op; λ = 0 terms are skipped, so λ = 0 is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib_ostaf.errors import IncompatibleModelError, InputError

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def check_lambda(value: object) -> float:
    """λ as a finite float, or InputError."""
    try:
        lam = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"λ (intensity) must be a number, got {value!r}") from None
    if not math.isfinite(lam):
        raise InputError(f"λ (intensity) must be finite, got {value!r}")
    return lam


class OffsetHooks:
    """Forward hooks adding ``scale · B(A x)`` to each target layer's output."""

    def __init__(self, modules: Mapping[str, nn.Linear], scale: float = 1.0) -> None:
        self.modules = dict(modules)
        self.scale = scale
        self.factors: Factors = {}
        self._handles = [
            m.register_forward_hook(self._hook(key)) for key, m in self.modules.items()
        ]

    def _hook(self, key: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            pair = self.factors.get(key)
            if pair is None or self.scale == 0:
                return None
            down, up = pair
            x = inputs[0]
            delta = F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
            return output + self.scale * delta

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.factors = {}

    def __enter__(self) -> OffsetHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def delta_weight(down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
    """ΔW = (alpha / r) · up @ down in float32 (alpha None → alpha = r, i.e. scale 1)."""
    rank = down.shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    return (up.float() @ down.float()) * scale


class WeightPatcher:
    """Merge ``Σ λ_i ΔW_i`` into Linear weights and restore them bit-exactly.

    ``deltas`` map a module name (as in ``modules``) to a float32 ΔW. A layer's backup is
    taken the first time it is touched and kept while any term touches it; re-merging
    always starts from the backup, never from merged weights. A new set of terms re-merges
    only the layers whose terms changed (:attr:`last_touched`): a step schedule switching
    one adapter costs that adapter's layers, nothing else.
    """

    def __init__(self, modules: Mapping[str, nn.Linear]) -> None:
        self.modules = dict(modules)
        self._backup: dict[str, torch.Tensor] = {}
        self._layer_terms: dict[str, tuple] = {}  # layer → ((identity, λ), ...) merged in it
        self._current: tuple = ()
        self.last_touched: list[str] = []  # layers restored or re-merged by the last apply

    @property
    def active(self) -> bool:
        return bool(self._current)

    def apply(self, adapters: Sequence[tuple[Hashable, Mapping[str, torch.Tensor], float]]) -> bool:
        """Merge ``[(identity, deltas, λ), ...]``; returns False when nothing had to change.

        ``identity`` names an adapter's content (e.g. its file hash): the same identities
        and λs as the current merge mean no work at all.
        """
        terms = [(key, d, check_lambda(lam)) for key, d, lam in adapters]
        terms = [(key, d, lam) for key, d, lam in terms if lam != 0.0 and d]
        for _, deltas, _ in terms:
            self._check(deltas)
        wanted = tuple((key, lam) for key, _, lam in terms)
        if wanted == self._current:
            self.last_touched = []
            return False
        layer_terms: dict[str, list] = {}
        for key, deltas, lam in terms:
            for name in deltas:
                layer_terms.setdefault(name, []).append((key, lam))
        changed = [
            n
            for n in dict.fromkeys([*self._layer_terms, *layer_terms])
            if tuple(layer_terms.get(n, ())) != self._layer_terms.get(n)
        ]
        try:
            with torch.no_grad():
                for name in changed:
                    self._restore_layer(name)
                    if name in layer_terms:
                        self._merge_layer(name, terms)
        except BaseException:
            self.restore()
            raise
        self._layer_terms = {n: tuple(t) for n, t in layer_terms.items()}
        self._current = wanted
        self.last_touched = changed
        return True

    def _merge_layer(self, name: str, terms: Sequence[tuple[Hashable, Mapping, float]]) -> None:
        total = None
        for _, deltas, lam in terms:
            delta = deltas.get(name)
            if delta is not None:
                total = lam * delta if total is None else total + lam * delta
        weight = self.modules[name].weight
        self._backup[name] = weight.detach().to("cpu", copy=True)
        merged = weight.detach().float() + total.to(weight.device)  # type: ignore[union-attr]
        weight.copy_(merged.to(weight.dtype))

    def _restore_layer(self, name: str) -> None:
        saved = self._backup.pop(name, None)
        if saved is not None:
            weight = self.modules[name].weight
            weight.copy_(saved.to(weight.device))

    def restore(self) -> None:
        """Put every touched weight back exactly as it was before the first apply."""
        with torch.no_grad():
            for name in list(self._backup):
                self._restore_layer(name)
        self._layer_terms = {}
        self._current = ()

    def _check(self, deltas: Mapping[str, torch.Tensor]) -> None:
        for name, delta in deltas.items():
            module = self.modules.get(name)
            if module is None:
                raise IncompatibleModelError(
                    f"the adapter targets a layer this model lacks: {name}"
                )
            if tuple(delta.shape) != tuple(module.weight.shape):
                raise IncompatibleModelError(
                    f"layer {name}: adapter offset has shape {tuple(delta.shape)}, "
                    f"the model's weight is {tuple(module.weight.shape)}"
                )
