"""CFG++: manifold-constrained CFG (Chung, Kim, Park, Nam & Ye, ICLR 2025, arXiv 2406.08070; methods.md §7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..branch import COND, UNCOND, Plan
from ..context import GuidanceContext
from ..ops.checks import check_number
from ..ops.guidance import cfg
from ..ops.shapes import per_sample_full
from ..registry import STRATEGIES
from .base import GuidanceStrategy, Predictions

__all__ = ["CFGPlusPlus"]


@STRATEGIES.register("cfg++")
@dataclass(frozen=True)
class CFGPlusPlus(GuidanceStrategy):
    """Interpolate the x0 with ``λ`` and re-noise with the *unconditional* noise (paper Alg. 1).

    CFG extrapolates (``w > 1``) and re-noises with the guided ε, which leaves the data manifold; CFG++
    takes ``x0_λ = D_u + λ (D_c - D_u)`` with ``λ ∈ [0, 1]`` and steps along ``ε_u``::

        DDIM:        z' = √ᾱ' x0_λ + √(1-ᾱ') ε_u
        Euler (VE):  x' = x0_λ + σ' (x - D_u) / σ
        flow Euler:  x_t' = (1 - t') x0_λ + t' ε_u

    all one update in EDM coordinates.

    **Heun** (no official rule exists; we follow the one the step hook implies): the predictor steps to
    ``x̂' = x0_λ + σ' ε_u``; the corrector's slope is the unconditional noise at ``(x̂', σ')``, and the
    trapezoid averages the two unconditional slopes. The guidance enters once, through the predictor's
    ``x0_λ``; the corrector's plan is ``(UNCOND,)`` (its conditional prediction would never reach the
    sample), so a Heun step costs 3 NFE, not 4.

    **DPM-Solver++(2M)**: the multistep history holds the previous step's *unconditional* denoised value
    (official CFG++ DPM-Solver++(2M), ComfyUI ``dpmpp_2m_cfg_pp``); the sampler keeps the x0 implied by the
    re-noise direction, which is ``D_u``. It is sampler-coupled: the guided loop returns
    :class:`~guidekit.samplers.Denoised` ``(x0_λ, ε_u)`` (:meth:`renoise_prediction`), and every sampler
    steps from ``x0_λ`` along ``ε_u``. For deterministic first-order samplers a step equals plain CFG at
    ``w_eff = λ σ / (σ - σ')`` (:func:`guidekit.ops.guidance.cfgpp_weight`); the last step
    (``σ' = 0``) returns CFG's x0 at ``λ``. λ ∈ [0, 1] behaves like ``w ∈ [1, 12.5]`` (README); the
    official SD1.5 setting is 0.6 (diffusers' experimental guider used 0.7).

    Args:
        scale: ``λ`` (named ``scale`` so that schedules and intervals can drive it); 0 is the unconditional
            sampler, 1 the conditional x0 re-noised with ``ε_u``.
    """

    scale: float = 0.6

    def __post_init__(self) -> None:
        check_number("scale", self.scale, low=0.0, high=1.0)  # λ: the paper's (and our documented) range

    @property
    def sampler_coupled(self) -> bool:
        return True

    def branches(self, ctx: GuidanceContext, state: Any) -> Plan:
        """Both branches on a step's first evaluation; only ``uncond`` on a corrector (see the Heun rule)."""
        return (COND, UNCOND) if ctx.substep == 0 else (UNCOND,)

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return cfg(pred_cond, pred_uncond, self.scale)

    def combine_branches(self, preds: Predictions, ctx: GuidanceContext, state: Any) -> tuple[Tensor, Any]:
        if "cond" not in preds:  # a corrector evaluation: only its slope (the unconditional noise) is used
            return preds["uncond"], state
        return self.combine(preds["cond"], preds["uncond"], ctx), state

    def renoise_prediction(self, preds: Predictions, ctx: GuidanceContext, state: Any = None) -> Tensor:
        """The prediction whose noise the sampler steps along: the unconditional one (the step hook)."""
        return preds["uncond"]

    def scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return per_sample_full(pred_cond, self.scale)
