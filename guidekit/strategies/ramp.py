"""Monotone increasing guidance schedules (Wang et al., TMLR 2024, arXiv 2404.13040; methods.md §9.9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..context import GuidanceContext
from ..ops.checks import check_choice, check_number
from ..ops.schedules import ramp_scale
from ..registry import STRATEGIES
from .base import GuidanceStrategy
from .cfg import CFG
from .scheduled import ScheduledScale

__all__ = ["Ramp"]


@STRATEGIES.register("ramp")
@dataclass(frozen=True)
class Ramp(ScheduledScale):
    """Guidance that grows from the noisiest step to the last, with the mean scale of ``inner``.

    "Analysis of CFG weight schedulers": simple increasing schedules help consistently. With progress
    ``τ_i = (i + 1/2) / N`` (step midpoints, so the discrete mean over the steps is exact) and
    ``ramp(τ) = 2τ`` (linear) or ``1 - cos πτ`` (cosine), reading A (default) ramps the guidance term,
    ``w_i = 1 + ramp(τ_i)(w̄ - 1)``; reading B ramps the scale, ``w_i = ramp(τ_i) w̄`` (the paper is
    ambiguous). Both average to ``w̄ = inner.scale``. ``min_scale`` is the paper's clamp ``max(c, w_i)``.

    Args:
        inner: strategy run at each step's scale; its ``scale`` is the mean ``w̄`` (default ``CFG(7.5)``).
        shape: ``"linear"`` or ``"cosine"``.
        reading: ``"A"`` (``1 + ramp (w̄ - 1)``, default) or ``"B"`` (``ramp w̄``).
        min_scale: optional clamp from below (SD1.5 2, SDXL 4, SD3 0.5 in the megapack's notes); it only raises.
    """

    inner: GuidanceStrategy = CFG(7.5)  # noqa: RUF009 - frozen, so a shared default is safe
    shape: Literal["linear", "cosine"] = "linear"
    reading: Literal["A", "B"] = "A"
    min_scale: float | None = None

    def __post_init__(self) -> None:
        self._check_inner()
        check_choice("shape", self.shape, ("linear", "cosine"))
        check_choice("reading", self.reading, ("A", "B"))
        if self.min_scale is not None:
            check_number("min_scale", self.min_scale)

    def scale_at(self, ctx: GuidanceContext) -> Tensor:
        progress = (ctx.step + 0.5) / max(ctx.num_steps, 1)
        w = ramp_scale(self.mean_scale, progress, self.shape, self.reading)
        if self.min_scale is not None:
            w = max(self.min_scale, w)
        return torch.full((ctx.sigma.shape[0],), w, dtype=torch.float64)
