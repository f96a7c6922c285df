"""Adaptive projected guidance (APG)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..context import GuidanceContext, StrategySpace
from ..errors import ConfigError
from ..ops.checks import is_finite_number
from ..ops.guidance import apg, apg_from_delta, momentum_update
from ..ops.shapes import upcast
from ..registry import STRATEGIES
from .base import GuidanceStrategy

__all__ = ["APG", "MomentumState"]

SDXL_NUMEL = 4 * 128 * 128
"""Per-sample size of an SDXL 1024² latent, the resolution the paper's ``norm_threshold = 15`` was tuned at."""


@dataclass(frozen=True)
class MomentumState:
    """APG's explicit state: the momentum buffer after step ``step`` and the one that step started from.

    ``running`` feeds the next step's predictor evaluation. A corrector evaluation (``substep > 0``) of
    step ``i`` combines with the buffer step ``i`` started from, whichever state it is handed: the
    predictor's (``step == i``: use ``before_step``) or, as the guided loop does, the start-of-step one
    (``step < i``: use ``running``). Either way the step is counted once.
    """

    running: Tensor
    before_step: Tensor
    step: int = -1


@STRATEGIES.register("apg")
@dataclass(frozen=True)
class APG(GuidanceStrategy):
    """Adaptive projected guidance (Sadat, Hilliges & Weber, ICLR 2025, arXiv 2410.02416, Algorithm 1).

    With ``Δ = c - u`` on denoised (x0) predictions::

        running = Δ + β · running               # reverse momentum, β < 0
        Δ       = running · min(1, r / ||running||)
        ĝ       = c + (w - 1) · (Δ_orth + η · Δ_par)   # split against c, per sample

    Norms and projections run per sample over all non-batch dims (the paper's ``dim=[-1, -2, -3]`` would
    give per-channel norms on 5D video). The three reductions are BLAS dot products and the per-sample
    coefficients are float64 (:func:`guidekit.ops.guidance.apg_from_delta`).

    **Paper vs diffusers.** diffusers' ``AdaptiveProjectedGuidance`` returns ``u + w · update`` with
    defaults ``eta=1``, no momentum; we follow the paper, ``c + (w - 1) · update``, with its SDXL defaults
    (Table 10). The two agree when ``update == Δ`` (``eta=1``, threshold not reached, no momentum), and
    diffusers' ``use_original_formulation=True`` with scale ``w - 1`` equals ours exactly.

    **State.** With ``momentum != 0`` the buffer is explicit state (:meth:`init_state`, :meth:`step`),
    advanced once per sampler step (``ctx.substep == 0``); a corrector evaluation combines its own ``Δ``
    with the buffer the step started from and leaves the state unchanged. A stateless call
    (``APG()(c, u, ctx)``) starts from a fresh buffer, which equals APG without momentum. At ``scale=1``
    the result is ``pred_cond``, no unconditional pass is needed, and the state passes through.

    **Resolution.** ``||Δ||`` grows like ``sqrt(numel)``; the threshold is *not* rescaled automatically.
    For other resolutions or video use :meth:`threshold_for` (``r·sqrt(numel / numel_ref)``).

    Args:
        scale: guidance weight ``w``; 1 gives ``pred_cond`` (no unconditional pass needed).
        eta: weight of the part of ``Δ`` parallel to ``c`` (0 drops it, 1 keeps it).
        norm_threshold: ``r``, the largest norm of the update per sample; 0 disables the rescaling.
        momentum: ``β`` of the momentum buffer, ``|β| < 1`` (the paper's is negative); 0 makes the strategy
            stateless.
    """

    space: ClassVar[StrategySpace] = "x0"

    scale: float = 15.0
    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5

    def __post_init__(self) -> None:
        for name in ("scale", "eta", "momentum"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        if not -1.0 < self.momentum < 1.0:  # the buffer sums β^k Δ: it diverges for |β| >= 1
            raise ConfigError(
                "momentum: expected a number with |momentum| < 1 (the paper uses negative values, "
                f"e.g. -0.5), got {self.momentum!r}"
            )
        if not is_finite_number(self.norm_threshold) or self.norm_threshold < 0:
            raise ConfigError(
                f"norm_threshold: expected a finite number >= 0 (0 disables it), got {self.norm_threshold!r}"
            )

    @classmethod
    def threshold_for(cls, norm_threshold: float, numel: int, numel_ref: int = SDXL_NUMEL) -> float:
        """``r · sqrt(numel / numel_ref)``: a threshold tuned at ``numel_ref`` elements per sample, moved to ``numel``.

        ``numel`` counts one sample's elements (``c·h·w`` or ``c·f·h·w``); the default reference is an SDXL
        latent ``4·128·128`` (stable-diffusion.cpp PR #1620 does the same).
        """
        if numel <= 0 or numel_ref <= 0:
            raise ConfigError(f"numel, numel_ref: expected positive element counts, got {numel} and {numel_ref}")
        return float(norm_threshold) * math.sqrt(numel / numel_ref)

    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return self.scale != 1.0

    def init_state(self, like: Tensor) -> MomentumState | None:
        if self.momentum == 0.0:
            return None
        zeros = torch.zeros(like.shape, dtype=upcast(like).dtype, device=like.device)
        return MomentumState(running=zeros, before_step=zeros)

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        if self.scale == 1.0:
            return pred_cond
        return apg(pred_cond, pred_uncond, self.scale, self.eta, self.norm_threshold)

    def combine_step(
        self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext, state: MomentumState | None
    ) -> tuple[Tensor, MomentumState | None]:
        if state is None or self.scale == 1.0:
            return self.combine(pred_cond, pred_uncond, ctx), state
        delta = upcast(pred_cond) - upcast(pred_uncond, upcast(pred_cond).dtype)
        if ctx.substep == 0:
            running = momentum_update(delta, state.running, self.momentum, inplace=True)
            state = MomentumState(running=running, before_step=state.running, step=ctx.step)
        else:
            start = state.before_step if state.step == ctx.step else state.running
            running = momentum_update(delta, start, self.momentum, inplace=True)
        return apg_from_delta(pred_cond, running, self.scale, self.eta, self.norm_threshold), state
