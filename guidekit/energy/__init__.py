"""Energy estimators, energy transforms and scale mappers for SAMG (spatially adaptive guidance).

SAMG = estimator ``(c, u, ctx) -> E`` -> transforms ``(E, ctx) -> E`` -> mapper ``(E, ctx) -> Ω``, then
``u + Ω ⊙ (c - u)``. Each module defines its component base and the built-ins; the formulas live in
:mod:`guidekit.ops.energy`. Importing this package registers the built-ins:

* estimators (``guidekit.energy``): ``delta-sq`` (default), ``x0-delta-sq``, ``delta-score``;
* transforms (``guidekit.transforms``): ``minmax``, ``gaussian-smooth``, ``quantile-clip``;
* mappers (``guidekit.mappers``): ``linear`` (default), ``threshold``, ``bound``.
"""

from __future__ import annotations

from .estimators import DeltaScore, DeltaSquared, EnergyEstimator, X0DeltaSquared
from .mappers import BoundMapper, Direction, LinearMapper, ScaleMapper, ThresholdMapper
from .transforms import EnergyTransform, GaussianSmooth, MinMax, QuantileClip

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
]
