"""S-CFG: semantic-aware classifier-free guidance (Shen, Song, Xue, Wang & Liu, CVPR 2024, arXiv 2404.05384)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..branch import COND, AttentionMaps, Branch, Plan
from ..context import GuidanceContext, StrategySpace
from ..errors import ConfigError
from ..ops.attention import region_rates, semantic_regions
from ..ops.checks import check_number
from ..registry import STRATEGIES
from .base import GuidanceStrategy, Predictions

__all__ = ["SCFG"]


@STRATEGIES.register("s-cfg")
@dataclass(frozen=True)
class SCFG(GuidanceStrategy):
    """``ε̃ = u + w · Ω ⊙ (c − u)`` with a per-region scale map ``Ω`` from the forward's attention maps.

    Regions come from the cross-attention maps, refined by self-attention (each recorded layer's
    ``S̃ = (S + 3 S²)/4`` times its cross-attention map, smoothed, normalised per token, averaged over layers:
    :func:`~guidekit.ops.attention.semantic_regions`): every position belongs to the context token it attends to
    most in the conditional forward; the foreground is where, in the unconditional forward, the other tokens
    together outweigh the first (start) token. Each region ``i`` is rescaled so its guidance norm matches the
    foreground's: ``Ω_i = mean_fg ‖Δ‖ / mean_i ‖Δ‖``, clamped to ``[low, high]`` and ``<= cap / w``, smoothed
    (:func:`~guidekit.ops.attention.region_rates`). This is the official code (SmilesDZgk/S-CFG ``sd/``); the
    paper's self-attention refinement ``Σ_k S^k / R`` is not what it runs.

    Both forwards record the maps (an :class:`~guidekit.branch.AttentionMaps` observer on ``cond`` and
    ``uncond``, no extra forward); the selected layers must include self- and cross-attention layers (a model
    without cross-attention is refused by the backend, naming its layers). Layers are paired by resolution
    and order (a cross-attention layer with the self-attention layer of its resolution recorded in the same
    position; with unequal counts, with their mean). ``w = 1`` is the conditional prediction. Called without
    maps (directly on two predictions) it is CFG.

    Args:
        scale: ``w`` (7.5, the official SD setting).
        low, high: the clamp of ``Ω`` (0.8, 3.0).
        cap: ``Ω <= cap / w`` (15).
        layers: attention selectors (regular expressions; ``("",)`` is every attention layer; the official
            SD 1.5 choice is the 16x16 and 8x8 levels: ``("down_blocks.2", "mid_block", "up_blocks.1")``).
    """

    scale: float = 7.5
    low: float = 0.8
    high: float = 3.0
    cap: float = 15.0
    layers: tuple[str, ...] = ("",)

    def __post_init__(self) -> None:
        check_number("scale", self.scale)
        check_number("low", self.low, low=0.0)
        check_number("high", self.high, low=self.low)
        check_number("cap", self.cap, low=0.0)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))  # from a JSON spec
        observer = AttentionMaps(self.layers, "both")
        plan = (Branch("cond", observe=observer), Branch("uncond", condition="uncond", observe=observer))
        object.__setattr__(self, "_plan", plan if self.scale != 1.0 else (COND,))

    @property  # type: ignore[override]
    def space(self) -> StrategySpace:  # type: ignore[override]
        return "eps" if self.scale != 1.0 else "any"  # w = 1 is the conditional prediction, in any space

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        return self._plan  # type: ignore[attr-defined, no-any-return]

    def observers(self) -> frozenset[str]:
        return frozenset({"self", "cross"})

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return pred_uncond + self.scale * (pred_cond - pred_uncond)

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        c = preds["cond"]
        if self.scale == 1.0 or "uncond" not in preds:
            return c, state
        u = preds["uncond"]
        omega = self.rates(c, u, ctx)
        return (u + self.scale * (c - u) if omega is None else u + self.scale * omega * (c - u)), state

    def rates(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor | None:
        """``Ω`` ``(b, 1, *spatial)`` from ``ctx.attention``, or ``None`` when the forwards recorded none."""
        attention = ctx.attention or {}
        if "cond" not in attention or "uncond" not in attention:
            return None
        spatial = tuple(pred_cond.shape[2:])
        dtype = pred_cond.dtype
        regions, _ = semantic_regions(_pairs(attention["cond"], dtype), spatial)
        _, fore = semantic_regions(_pairs(attention["uncond"], dtype), spatial)
        one_hot = (regions == regions.max(dim=1, keepdim=True).values).to(dtype)
        foreground = 1.0 - (fore[:, :1] == fore.max(dim=1, keepdim=True).values).to(dtype)
        one_hot, foreground = (F.interpolate(m, size=spatial, mode="nearest") for m in (one_hot, foreground))
        return region_rates(pred_cond - pred_uncond, one_hot, foreground, self.low, self.high, self.cap / self.scale)

    def scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor | None:
        omega = self.rates(pred_cond, pred_uncond, ctx)
        return None if omega is None else self.scale * omega


def _pairs(maps: dict[str, Tensor] | Any, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """``(self map, cross map)`` pairs: per resolution (query count), in recording order."""
    selfs: dict[int, list[Tensor]] = {}
    crosses: dict[int, list[Tensor]] = {}
    for key, amap in maps.items():
        (selfs if key.startswith("self:") else crosses).setdefault(amap.shape[1], []).append(amap.to(dtype))
    if not crosses:
        raise ConfigError(f"layers: S-CFG needs cross-attention maps, the selected layers recorded only {sorted(maps)}")
    pairs = []
    for n, cross in crosses.items():
        own = selfs.get(n)
        if not own:
            raise ConfigError(
                f"layers: S-CFG pairs each cross-attention map with a self-attention map of its resolution; no "
                f"self-attention layer with {n} tokens among {sorted(maps)}"
            )
        if len(own) != len(cross):
            own = [torch.stack(own).mean(0)] * len(cross)
        pairs.extend(zip(own, cross, strict=True))
    return pairs
