"""Scale mappers ``(energy, ctx) -> Ω`` bounded in ``[w_min, w_max]`` (methods.md §3.2-§3.4)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from ..component import Component
from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_choice, check_number
from ..ops.energy import DEFAULT_TAU, bound_scale, linear_scale, threshold_scale
from ..registry import MAPPERS
from .estimators import DeltaSquared, EnergyEstimator, X0DeltaSquared
from .transforms import EnergyTransform, MinMax

__all__ = ["BoundMapper", "Direction", "LinearMapper", "ScaleMapper", "ThresholdMapper"]

Direction = Literal["decreasing", "increasing"]
"""``decreasing``: high energy -> low scale (the SAMG paper); ``increasing``: the mirrored control."""


@dataclass(frozen=True)
class ScaleMapper(Component, ABC):
    """An energy-to-scale map ``(energy, ctx) -> Ω``, same shape, bounded in ``[w_min, w_max]``.

    Args:
        w_min: conservative scale, given to the highest-energy points (decreasing direction).
        w_max: aggressive scale, given to the lowest-energy points; ``w_min <= w_max``.
        direction: ``"decreasing"`` (the paper: high energy -> low scale) or ``"increasing"``, the mirrored
            control ``Ω_inc = w_min + w_max - Ω_dec``.
    """

    registry: ClassVar = MAPPERS
    needs_unit_energy: ClassVar[bool] = False
    """True if the mapper expects energy in ``[0, 1]`` (min-max normalised) to stay within its bounds."""

    w_min: float = 5.0
    w_max: float = 12.0
    direction: Direction = "decreasing"

    def __post_init__(self) -> None:
        w_min = check_number("w_min", self.w_min)
        w_max = check_number("w_max", self.w_max)
        if w_min > w_max:
            raise ConfigError(f"w_min, w_max: expected w_min <= w_max, got w_min={w_min} > w_max={w_max}")
        check_choice("direction", self.direction, ("decreasing", "increasing"))
        object.__setattr__(self, "w_min", w_min)
        object.__setattr__(self, "w_max", w_max)

    @property
    def decreasing(self) -> bool:
        """``direction == "decreasing"``."""
        return self.direction == "decreasing"

    @abstractmethod
    def __call__(self, energy: Tensor, ctx: GuidanceContext) -> Tensor:
        """The scale map ``Ω``, same shape as ``energy``, with values in ``[w_min, w_max]``."""

    def default_energy(self) -> EnergyEstimator:
        """The estimator :class:`guidekit.SAMG` pairs with this mapper when none is given."""
        return DeltaSquared()

    def default_transforms(self) -> tuple[EnergyTransform, ...]:
        """The transforms :class:`guidekit.SAMG` uses with this mapper when none are given."""
        return (MinMax(),) if self.needs_unit_energy else ()


@MAPPERS.register("linear")
@dataclass(frozen=True)
class LinearMapper(ScaleMapper):
    """``Ω = w_max - Ê · (w_max - w_min)`` on min-max normalised energy ``Ê ∈ [0, 1]`` (methods.md §3.2).

    The highest-energy point gets ``w_min``, the lowest ``w_max`` (``direction="increasing"``: the
    reverse). A linear surrogate of the ``1/√E`` bound (§3.3). Needs normalised energy: :class:`guidekit.SAMG`
    puts :class:`~guidekit.energy.MinMax` before it by default and refuses transforms that do not end in
    ``[0, 1]``.
    """

    needs_unit_energy: ClassVar[bool] = True

    def __call__(self, energy: Tensor, ctx: GuidanceContext) -> Tensor:
        return linear_scale(energy, self.w_min, self.w_max, self.decreasing)


@MAPPERS.register("threshold")
@dataclass(frozen=True)
class ThresholdMapper(ScaleMapper):
    """Two-level ("multi") guidance: ``w_min`` where ``E > Q_q(E)``, else ``w_max`` (methods.md §3.4).

    ``Q_q`` is the per-sample q-quantile over all points (the whole clip for video). Invariant to scaling
    the energy (and to any increasing transform, up to the ``tau`` margin), so it needs no normalisation.

    Args:
        q: quantile in ``[0, 1]``; the fraction ``1 - q`` of highest-energy points gets the conservative scale.
        tau: a point must exceed the quantile by ``tau · max E``; keeps rounding noise of a uniform energy
            from splitting it into two levels. 0 = the bare rule.
    """

    q: float = 0.5
    tau: float = DEFAULT_TAU

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "q", check_number("q", self.q, low=0.0, high=1.0))
        object.__setattr__(self, "tau", check_number("tau", self.tau, low=0.0))

    def __call__(self, energy: Tensor, ctx: GuidanceContext) -> Tensor:
        return threshold_scale(energy, self.q, self.w_min, self.w_max, self.decreasing, self.tau)


@MAPPERS.register("bound")
@dataclass(frozen=True)
class BoundMapper(ScaleMapper):
    """Curvature bound ``Ω = clip(1 + K / √(E + eps), w_min, w_max)`` (methods.md §3.3, *reconstructed*).

    CFG moves x0 along a straight line of length ``d = (w - 1)‖Δx0‖``; on a manifold of curvature κ that
    leaves it by ``κd²/2``. Bounding that by δ gives ``w ≤ 1 + K/‖Δx0‖`` with ``K = √(2δ/κ)``. Reads
    *absolute* energy, so :class:`guidekit.SAMG` pairs it with the x0-space energy and no normalisation.

    Args:
        k: the constant ``K`` in x0 units (the energy's square root). **Uncalibrated**: the paper's value
            could not be read; the default 1.0 puts ``Ω = 5`` where the channel-RMS of ``Δx0`` is 0.25 and
            ``Ω = 12`` where it is 0.09 (with ``reduce="mean"``). Calibrate per model (docs/samg.md).
        eps: added to ``E`` before the square root (``E = 0`` then maps to ``w_max``); must be > 0.
    """

    k: float = 1.0
    eps: float = 1e-12

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "k", check_number("k", self.k, low=0.0))
        eps = check_number("eps", self.eps, low=0.0)
        if eps == 0.0:
            raise ConfigError(f"eps: expected a number > 0, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)

    def __call__(self, energy: Tensor, ctx: GuidanceContext) -> Tensor:
        return bound_scale(energy, self.k, self.eps, self.w_min, self.w_max, self.decreasing)

    def default_energy(self) -> EnergyEstimator:
        return X0DeltaSquared()
