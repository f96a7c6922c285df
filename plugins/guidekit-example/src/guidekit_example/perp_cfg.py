"""Perpendicular CFG: classifier-free guidance without the part of ``c - u`` along ``u``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from guidekit import ConfigError, GuidanceContext, GuidanceStrategy
from guidekit.context import StrategySpace
from guidekit.ops.guidance import project
from guidekit.ops.shapes import upcast

__all__ = ["PerpCFG"]


@dataclass(frozen=True)
class PerpCFG(GuidanceStrategy):
    """``ĝ = c + (w - 1) · Δ_⊥u`` with ``Δ = c - u`` and ``Δ_⊥u`` its part orthogonal to ``u``, per sample.

    This is the small-angle limit of angle-domain guidance (ADG; Jin, Xiao, Liu & Gu, ICML 2025,
    arXiv 2506.11039): rotating ``x0_c`` away from ``x0_u`` by ``(w - 1)·θ`` with ``θ → 0`` moves it by
    ``(w - 1)`` times the component of ``Δ`` orthogonal to ``x0_u``. The dropped component ``Δ_∥u``
    mostly changes the *norm* of the prediction, the over-saturation of large CFG scales. Defined on
    denoised predictions (``space = "x0"``), like ADG.

    Registered as ``"perp-cfg"`` by this package's entry point, not by a decorator: installing the
    package is what makes ``guidekit.build("perp-cfg")`` work.

    Args:
        scale: guidance weight ``w``; 1 gives ``pred_cond`` (no unconditional pass needed).
    """

    space: ClassVar[StrategySpace] = "x0"

    scale: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, int | float) or isinstance(self.scale, bool) or not math.isfinite(self.scale):
            raise ConfigError(f"scale: expected a finite number, got {self.scale!r}")

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.scale != 1.0

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        if self.scale == 1.0:
            return pred_cond
        c, u = upcast(pred_cond), upcast(pred_uncond)
        _, orthogonal = project(c - u, u)  # float64 inside, per sample over all non-batch dims
        return (c + (self.scale - 1.0) * orthogonal).to(pred_cond.dtype)
