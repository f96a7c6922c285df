"""Component bases of SAMG's pipeline: energy estimator -> energy transforms -> scale mapper.

Each concrete component is a frozen dataclass registered in its own group (``ENERGY``, ``TRANSFORMS``,
``MAPPERS``), so it can be named in a config and swapped in :class:`guidekit.SAMG`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from ..component import Component
from ..context import GuidanceContext
from ..errors import ConfigError
from ..registry import ENERGY, MAPPERS, TRANSFORMS

__all__ = ["Direction", "EnergyEstimator", "EnergyTransform", "ScaleMapper", "check_choice", "check_number"]

Direction = Literal["decreasing", "increasing"]
"""``decreasing``: high energy -> low scale (the SAMG paper); ``increasing``: the mirrored control."""


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float, or :class:`ConfigError` naming ``name`` if it is not a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{name}: expected a number >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name}: expected a number <= {high}, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """:class:`ConfigError` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


class EnergyEstimator(Component, ABC):
    """Point-wise guidance energy ``(pred_cond, pred_uncond, ctx) -> (b, 1, *spatial)``, non-negative.

    Predictions are ``(b, c, *spatial)`` in the space ``ctx.space``; the result is float32 (float64 for
    float64 inputs) and is the same for every channel of a point.
    """

    registry: ClassVar = ENERGY

    @abstractmethod
    def __call__(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        """The energy map ``(b, 1, *spatial)``."""


class EnergyTransform(Component, ABC):
    """An energy-to-energy map ``(energy, ctx) -> energy`` of the same shape (normalise, smooth, clip)."""

    registry: ClassVar = TRANSFORMS

    @abstractmethod
    def __call__(self, energy: Tensor, ctx: GuidanceContext) -> Tensor:
        """The transformed energy, same shape as ``energy``."""

    def unit_range(self, unit_in: bool) -> bool:
        """Whether the output lies in ``[0, 1]``, given whether the input does (``False``: not known).

        :class:`guidekit.SAMG` uses it to refuse a mapper that needs normalised energy without a
        normalising transform before it.
        """
        return False


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
        from .estimators import DeltaSquared

        return DeltaSquared()

    def default_transforms(self) -> tuple[EnergyTransform, ...]:
        """The transforms :class:`guidekit.SAMG` uses with this mapper when none are given."""
        if self.needs_unit_energy:
            from .transforms import MinMax

            return (MinMax(),)
        return ()
