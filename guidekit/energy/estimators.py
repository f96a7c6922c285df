"""Energy estimators: the point-wise guidance energy of SAMG (methods.md §3.1 point 4, §3.3, §3.4 step 2).

The paper's exact energy could not be read (methods.md §3.1); these are the three candidates it names.
All reduce over the channel dim of ``(b, c, *spatial)`` (so 5D video gives one energy per frame point)
and differ from each other only by a per-sample factor. After a per-sample min-max normalisation (the
default pipeline) they give the same scale map; they differ for mappers that read absolute energy
(:class:`~guidekit.energy.BoundMapper`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..component import Component
from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_choice
from ..ops.energy import Reduce, delta_energy
from ..ops.shapes import per_sample
from ..ops.spaces import x0_delta_scale
from ..registry import ENERGY

__all__ = ["DeltaScore", "DeltaSquared", "EnergyEstimator", "X0DeltaSquared"]


class EnergyEstimator(Component, ABC):
    """Point-wise guidance energy ``(pred_cond, pred_uncond, ctx) -> (b, 1, *spatial)``, non-negative.

    Predictions are ``(b, c, *spatial)`` in the space ``ctx.space``; the result is float32 (float64 for
    float64 inputs) and is the same for every channel of a point.
    """

    registry: ClassVar = ENERGY

    @abstractmethod
    def __call__(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        """The energy map ``(b, 1, *spatial)``."""


@dataclass(frozen=True)
class _ChannelEnergy(EnergyEstimator):
    """Shared ``reduce`` option: ``"mean"`` (default) or ``"sum"`` of the squares over channels."""

    reduce: Reduce = "mean"

    def __post_init__(self) -> None:
        check_choice("reduce", self.reduce, ("mean", "sum"))


def _x0_scale(ctx: GuidanceContext, sigma: Tensor, like: Tensor, who: str) -> Tensor:
    """``x0_delta_scale(ctx.space, sigma)`` shaped like ``like``, or a clear error when the space is unknown."""
    if ctx.space is None:
        raise ConfigError(
            f"ctx.space: expected the prediction space ('eps', 'v', 'flow' or 'x0') for {who}, which converts Δ "
            "to x0, got None (use DeltaSquared, which needs no space)"
        )
    return per_sample(x0_delta_scale(ctx.space, sigma), like)


@ENERGY.register("delta-sq")
@dataclass(frozen=True)
class DeltaSquared(_ChannelEnergy):
    """``E(p) = mean_c (c - u)(p)²`` in the predictions' own space (methods.md §3.2; the default).

    Args:
        reduce: ``"mean"`` over channels (comfy-cfg-megapack) or ``"sum"`` (``‖Δ(p)‖²``); the choice only
            rescales the energy by the channel count.
    """

    def __call__(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        return delta_energy(pred_cond, pred_uncond, self.reduce)


@ENERGY.register("x0-delta-sq")
@dataclass(frozen=True)
class X0DeltaSquared(_ChannelEnergy):
    """``E(p) = mean_c (Δx0(p))²``: the energy of ``Δ = c - u`` converted to x0 (denoised) space.

    ``Δx0 = k · Δ`` with ``k = x0_delta_scale(ctx.space, ctx.sigma)`` per sample (methods.md §2:
    eps ``-σ``, VP v ``-σ/√(1+σ²)``, flow ``-t``), so the energy is the same whatever space the
    predictions are in. The energy the curvature bound (§3.3) is stated in.
    """

    def __call__(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        energy = delta_energy(pred_cond, pred_uncond, self.reduce)
        return energy.mul_(_x0_scale(ctx, ctx.sigma, energy, "X0DeltaSquared").square())


@ENERGY.register("delta-score")
@dataclass(frozen=True)
class DeltaScore(_ChannelEnergy):
    """``E(p) = mean_c (Δs(p))²``, the squared magnitude of the delta score ``Δs = -Δε / σ`` (the title's).

    ``Δε`` comes from the current space through x0: ``Δε = -Δx0 / σ`` with
    ``Δx0 = x0_delta_scale(ctx.space, σ) · Δ``, so ``Δs = Δx0 / σ²``, with σ the EDM sigma of the context.
    That is the score in EDM (VE) coordinates ``x / α``; the paper's VP-coordinate score differs from it by
    the per-sample factor ``α``, which cancels in any per-sample normalisation. Needs ``σ > 0``.
    """

    def __call__(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        sigma = ctx.sigma
        if not bool((sigma > 0).all()):
            raise ConfigError(
                f"ctx.sigma: expected > 0 for the delta-score energy (it divides by sigma²), got "
                f"{sigma.tolist() if sigma.numel() <= 8 else 'min ' + str(float(sigma.min()))}"
            )
        energy = delta_energy(pred_cond, pred_uncond, self.reduce)
        k = _x0_scale(ctx, sigma, energy, "DeltaScore") / per_sample(sigma, energy).square()
        return energy.mul_(k.square())
