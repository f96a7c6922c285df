"""Energy estimators, energy transforms and scale mappers for SAMG (spatially adaptive guidance).

SAMG = estimator ``(c, u, ctx) -> E`` -> transforms ``(E, ctx) -> E`` -> mapper ``(E, ctx) -> Ω``, then
``u + Ω ⊙ (c - u)``. Importing this package registers the built-ins:

* estimators (``guidekit.energy``): ``delta-sq`` (default), ``x0-delta-sq``, ``delta-score``;
* transforms (``guidekit.transforms``): ``minmax``, ``gaussian-smooth``, ``quantile-clip``;
* mappers (``guidekit.mappers``): ``linear`` (default), ``threshold``, ``bound``.
"""

from __future__ import annotations

from . import functional
from .base import Direction, EnergyEstimator, EnergyTransform, ScaleMapper
from .estimators import DeltaScore, DeltaSquared, X0DeltaSquared
from .mappers import BoundMapper, LinearMapper, ThresholdMapper
from .transforms import GaussianSmooth, MinMax, QuantileClip

__all__ = [
    "BoundMapper",
    "DeltaScore",
    "DeltaSquared",
    "Direction",
    "EnergyEstimator",
    "EnergyTransform",
    "GaussianSmooth",
    "LinearMapper",
    "MinMax",
    "QuantileClip",
    "ScaleMapper",
    "ThresholdMapper",
    "X0DeltaSquared",
    "functional",
]
