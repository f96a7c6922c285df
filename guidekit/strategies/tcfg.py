"""TCFG: tangential-damping CFG (Kwon, Kim, Jeong, Hsiao & Uh, CVPR 2025, arXiv 2503.18137; methods.md §9.2)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..context import GuidanceContext
from ..ops.checks import check_number
from ..ops.guidance import tcfg
from ..registry import STRATEGIES
from .base import GuidanceStrategy

__all__ = ["TCFG"]


@STRATEGIES.register("tcfg")
@dataclass(frozen=True)
class TCFG(GuidanceStrategy):
    """CFG against the unconditional prediction projected on the top singular direction of ``[c; u]``.

    ``u' = ⟨u, v1⟩ v1`` with ``v1`` the top right-singular vector of the ``(2, N)`` matrix of the flattened
    predictions (paper eq. 8), then ``u' + w (c - u')``. This damps the tangential part of ``u`` that
    points off the data manifold. diffusers' ``TangentialClassifierFreeGuidance`` runs a float32 SVD; we
    take the closed-form eigenvector of the 2x2 Gram matrix in float64
    (:func:`guidekit.ops.guidance.tangential_projection`), the same projection at O(N) cost.
    Space: the model's raw output (eps for UNets, velocity for SD3), as in diffusers.

    Args:
        scale: guidance weight ``w`` (SD1.5 7.5, SDXL 5, SD3 7 in the paper's runs).
    """

    scale: float = 7.5

    space = "native"

    def __post_init__(self) -> None:
        check_number("scale", self.scale)

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.scale != 1.0

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        if self.scale == 1.0:
            return pred_cond
        return tcfg(pred_cond, pred_uncond, self.scale)
