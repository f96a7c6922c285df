"""ADG: angle-domain guidance (Jin, Xiao, Liu & Gu, ICML 2025, arXiv 2506.11039; methods.md §8)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..context import GuidanceContext
from ..ops.checks import check_number
from ..ops.guidance import adg
from ..registry import STRATEGIES
from .base import GuidanceStrategy

__all__ = ["ADG"]


@STRATEGIES.register("adg")
@dataclass(frozen=True)
class ADG(GuidanceStrategy):
    """Rotate the conditional x0 away from the unconditional one by a clipped angle (paper eq. 9).

    CFG's colour saturation at high ``w`` comes from norm amplification of the latent; ADG moves in the
    angle domain instead: with θ the angle between ``x0_c`` and ``x0_u`` and ``w' = max(w - 1, 0) + floor``,
    the output is ``x0_c`` rotated by ``min(w'θ, max_angle)`` in the plane of the two, so its norm stays
    below ``√2 ‖x0_c‖``. Official rule of jinc7461/ADG (``method/ADG_SD3.py``), in x0 space, float64;
    see :func:`guidekit.ops.guidance.adg`.

    Args:
        scale: guidance weight ``w`` (official API default 7.0; the README runs SD3.5 at 4). ``w <= 1``
            gives no rotation.
        max_angle: the clip ``A`` on the rotation angle, radians (official ``3.14 / 3``).
        weight_floor: added to ``max(w - 1, 0)`` (official ``1e-3``); ``0`` makes ``scale = 1`` exactly
            the conditional prediction.
    """

    scale: float = 7.0
    max_angle: float = 3.14 / 3
    weight_floor: float = 1e-3

    space = "x0"

    def __post_init__(self) -> None:
        check_number("scale", self.scale)
        check_number("max_angle", self.max_angle, low=0.0, high=math.pi)
        check_number("weight_floor", self.weight_floor, low=0.0)

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return max(self.scale - 1.0, 0.0) + self.weight_floor > 0.0

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        if not self.needs_uncond(ctx):
            return pred_cond
        return adg(pred_cond, pred_uncond, self.scale, self.max_angle, self.weight_floor)
