"""The OSTAF hypernetwork (our reconstruction; see docs/method.md).

The paper says a *lightweight hypernetwork predicts weight offsets* for the attention
layers of the UNet encoder or decoder. We read that as: one network, shared by every
target layer, maps a learned per-layer code (plus an embedding of the layer kind, e.g.
``attn2.to_k``) to rank-r factors ``(A, B)`` of that layer, so ``ΔW = B·A`` is exactly a
LoRA of rank r and exports losslessly to a kohya file. The up head is zero-initialised,
so training starts from the base model (ΔW = 0).

Sharing the trunk and the heads couples the layers' updates: a gradient step moves every
layer's offset through the same few parameters, which is the smoothing/regularising
effect the paper attributes to the hypernetwork (measured in bench/).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lib_ostaf.errors import InputError


@dataclass(frozen=True)
class LayerShape:
    """What the hypernetwork needs to know about one target Linear layer."""

    key: str  # kohya module name, unique per layer
    kind: str  # e.g. "attn2.to_k": layers of one kind share an embedding
    in_features: int
    out_features: int


@dataclass(frozen=True)
class HypernetConfig:
    rank: int = 4
    code_dim: int = 32
    hidden: int = 128

    def __post_init__(self) -> None:
        for field in ("rank", "code_dim", "hidden"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{field} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class OstafHypernet(nn.Module):
    """Learned per-layer codes → shared trunk → per-width heads → (A, B) per layer."""

    def __init__(self, layers: Sequence[LayerShape], config: HypernetConfig) -> None:
        super().__init__()
        if not layers:
            raise InputError("the hypernetwork needs at least one target layer")
        keys = [layer.key for layer in layers]
        if len(set(keys)) != len(keys):
            raise InputError("target layer keys must be unique")
        self.layers = list(layers)
        self.config = config
        r, d, h = config.rank, config.code_dim, config.hidden
        kinds = sorted({layer.kind for layer in layers})
        self.kind_index = {kind: i for i, kind in enumerate(kinds)}

        # Orthogonal-ish random codes keep layers distinguishable from the first step.
        self.codes = nn.Parameter(torch.randn(len(layers), d) / math.sqrt(d))
        self.kind_embedding = nn.Embedding(len(kinds), d)
        nn.init.normal_(self.kind_embedding.weight, std=1.0 / math.sqrt(d))
        self.trunk = nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU())
        # One head per distinct input width (A) and output width (B).
        self.down_heads = nn.ModuleDict(
            {str(n): nn.Linear(h, r * n) for n in sorted({x.in_features for x in layers})}
        )
        self.up_heads = nn.ModuleDict(
            {str(n): nn.Linear(h, n * r) for n in sorted({x.out_features for x in layers})}
        )
        for head in self.up_heads.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self._rows_in = _rows_by(layers, "in_features")
        self._rows_out = _rows_by(layers, "out_features")
        self.register_buffer(
            "kind_ids",
            torch.tensor([self.kind_index[x.kind] for x in layers], dtype=torch.long),
            persistent=False,
        )

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factors of every layer: ``{key: (A [r, in], B [out, r])}`` with ΔW = B·A.

        Each head runs once on the stacked features of all layers of its width (a handful
        of calls per step, not two per layer — see docs/performance.md).
        """
        r = self.config.rank
        features = self.trunk(self.codes + self.kind_embedding(self.kind_ids))
        down: dict[int, torch.Tensor] = {}
        up: dict[int, torch.Tensor] = {}
        for width, rows in self._rows_in.items():
            # 1/sqrt(in) keeps A x of unit scale, as LoRA's Kaiming init of lora_down does.
            y = self.down_heads[str(width)](features[rows]).view(len(rows), r, width)
            down.update(zip(rows, (y / math.sqrt(width)).unbind(0), strict=True))
        for width, rows in self._rows_out.items():
            y = self.up_heads[str(width)](features[rows]).view(len(rows), width, r)
            up.update(zip(rows, y.unbind(0), strict=True))
        return {layer.key: (down[i], up[i]) for i, layer in enumerate(self.layers)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class DirectLoRA(nn.Module):
    """Independent LoRA factors per layer — the ablation "tune weights directly".

    Same interface as :class:`OstafHypernet` so the trainer and the benchmark can swap them.
    """

    def __init__(self, layers: Sequence[LayerShape], config: HypernetConfig) -> None:
        super().__init__()
        self.layers = list(layers)
        self.config = config
        r = config.rank
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for layer in layers:
            down = torch.empty(r, layer.in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(layer.out_features, r)))

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {layer.key: (self.down[i], self.up[i]) for i, layer in enumerate(self.layers)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _rows_by(layers: Sequence[LayerShape], attr: str) -> dict[int, list[int]]:
    """Layer indices grouped by a width (``in_features`` or ``out_features``)."""
    rows: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        rows.setdefault(getattr(layer, attr), []).append(i)
    return rows


OFFSET_NETWORKS = {"hypernet": OstafHypernet, "lora": DirectLoRA}
