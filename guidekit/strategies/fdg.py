"""FDG: frequency-decoupled guidance (Sadat, Vontobel, Salehi & Weber, arXiv 2506.19713; methods.md §9.10)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_number
from ..ops.frequency import fdg
from ..registry import STRATEGIES
from .base import GuidanceStrategy

__all__ = ["FDG"]


@STRATEGIES.register("fdg")
@dataclass(frozen=True)
class FDG(GuidanceStrategy):
    """CFG with one scale per level of a Laplacian pyramid (paper Alg. 1; diffusers ``FrequencyDecoupledGuidance``).

    Low guidance on the coarse levels keeps colour and composition varied; high guidance on the fine
    levels sharpens detail. The pyramid is plain torch (:mod:`guidekit.ops.frequency`, kornia's filters), and
    reconstructs exactly for every size. 5D latents run per frame. Optional per-level ``parallel_weights``
    down-weight the part of ``Δ_k`` parallel to ``c_k`` (APG-style, float64).

    Without parallel weights FDG is linear in the predictions, so it gives the same sample in every space;
    with them it follows diffusers and runs on the model's raw output (``space = "native"``).

    Args:
        scales: one weight per level, finest first (SDXL, paper Table 8: ``(10.0, 5.0)``). Equal scales
            are CFG; one level is CFG.
        parallel_weights: ``None`` (all 1: plain Δ) or one weight per level in ``[0, 1]`` typically.
    """

    scales: tuple[float, ...] = (10.0, 5.0)
    parallel_weights: tuple[float, ...] | None = None

    space = "native"
    contract_exempt: ClassVar[dict[str, str]] = {
        "rank_flattening": "the pyramid filters each frame's (h, w) plane; merging frames into h changes the image",
    }

    def __post_init__(self) -> None:
        scales = _as_tuple("scales", self.scales)
        if not scales:
            raise ConfigError(f"scales: expected at least one level, got {self.scales!r}")
        object.__setattr__(self, "scales", scales)
        if self.parallel_weights is not None:
            weights = _as_tuple("parallel_weights", self.parallel_weights)
            if len(weights) != len(scales):
                raise ConfigError(
                    f"parallel_weights: expected one weight per level ({len(scales)}), got {len(weights)}: {weights!r}"
                )
            object.__setattr__(self, "parallel_weights", weights)

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return any(w != 1.0 for w in self.scales)

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        if not self.needs_uncond(ctx):
            return pred_cond
        return fdg(pred_cond, pred_uncond, self.scales, self.parallel_weights)


def _as_tuple(name: str, values: object) -> tuple[float, ...]:
    if not isinstance(values, tuple | list):
        raise ConfigError(f"{name}: expected a sequence of numbers, got {values!r}")
    return tuple(check_number(f"{name}[{i}]", v) for i, v in enumerate(values))
