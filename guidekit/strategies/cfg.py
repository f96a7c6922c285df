"""Classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..context import GuidanceContext
from ..ops.checks import check_number
from ..ops.guidance import cfg
from ..ops.shapes import per_sample_full
from ..registry import STRATEGIES
from .base import GuidanceStrategy

__all__ = ["CFG"]


@STRATEGIES.register("cfg")
@dataclass(frozen=True)
class CFG(GuidanceStrategy):
    """Classifier-free guidance, ``u + scale · (c - u)`` (Ho & Salimans 2022, eq. 6).

    Imagen/diffusers convention: ``scale = 1`` is the conditional prediction alone (and then the loop skips
    the unconditional forward), ``scale = 0`` the unconditional one. Linear, so it gives the same sample in
    every prediction space (methods.md §2).

    Args:
        scale: guidance weight ``w``; the diffusers pipelines' defaults are 7.5 (SD1.5), 5 (SDXL),
            7 (SD3), 6 (CogVideoX).
    """

    scale: float = 7.5

    def __post_init__(self) -> None:
        check_number("scale", self.scale)

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.scale != 1.0

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        if self.scale == 1.0:
            return pred_cond
        return cfg(pred_cond, pred_uncond, self.scale)

    def scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return per_sample_full(pred_cond, self.scale)
