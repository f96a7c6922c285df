"""SAMG: spatially adaptive multi guidance (Li et al., arXiv 2604.26503; methods.md §3)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor

from ..context import GuidanceContext
from ..energy import DeltaSquared, EnergyEstimator, EnergyTransform, LinearMapper, MinMax, ScaleMapper
from ..errors import ConfigError, ShapeError
from ..ops.checks import check_number, check_pair
from ..ops.energy import samg_scale_map
from ..ops.guidance import cfg
from ..registry import STRATEGIES
from .base import GuidanceStrategy

__all__ = ["DEFAULT_RANGE", "SAMG", "range_from_scale"]

DEFAULT_RANGE: tuple[float, float] = (5.0, 12.0)
"""``[w_min, w_max]`` for SD1.5/SDXL at a base scale of 7.5 (comfy-cfg-megapack, unverified; §3.4)."""


def range_from_scale(w: float) -> tuple[float, float]:
    """``(2w/3, 8w/5)``: the SD1.5 ratio of ``[5, 12]`` to 7.5 (comfy-cfg-megapack, methods.md §3.2)."""
    return 2.0 * w / 3.0, 8.0 * w / 5.0


@STRATEGIES.register("samg")
@dataclass(frozen=True)
class SAMG(GuidanceStrategy):
    """Spatially adaptive guidance ``u + Ω ⊙ (c - u)`` with a per-point scale map Ω (methods.md §3).

    ``E = energy(c, u)`` is a point-wise guidance energy ``(b, 1, *spatial)``, the ``transforms`` refine it
    (default: per-sample min-max normalisation), and ``mapper`` turns it into ``Ω ∈ [w_min, w_max]``:
    the conservative ``w_min`` where the energy is high (edges, texture), the aggressive ``w_max`` where
    it is low (flat regions). Ω is shared by all channels of a point. The paper's method section could
    not be read: the default pipeline is the one concrete formula found (comfy-cfg-megapack, §3.2)

        ``Ê = (E - min E) / (max E - min E + τ max E)``,  ``Ω = w_max - Ê (w_max - w_min)``,

    and every other reading of the abstract is a swappable component (docs/samg.md).

    Args:
        w_min: conservative scale (default 5). With ``w_max``, a shorthand for the mapper's range.
        w_max: aggressive scale (default 12); ``w_min <= w_max``.
        w: base CFG scale instead of a range: ``[w_min, w_max] = [2w/3, 1.6w]``, so ``w=7.5`` is ``[5, 12]``.
            Stored as the range it gives (``w`` becomes ``None``).
        energy: energy estimator; default the mapper's (:class:`~guidekit.energy.DeltaSquared`, or
            :class:`~guidekit.energy.X0DeltaSquared` for the bound mapper).
        transforms: energy transforms applied in order; default the mapper's (``(MinMax(),)`` for the
            linear mapper, none for the others).
        mapper: scale mapper; default ``LinearMapper(w_min, w_max)``. A given mapper carries its own
            range; ``w_min``/``w_max``/``w`` may then be left out or must agree with it.

    ``w_min == w_max == w`` is exactly ``CFG(w)``. Linear in the predictions once Ω is fixed, and the
    default Ω is invariant to per-sample scaling of Δ, so SAMG gives the same sample in every prediction
    space (``space = "any"``); the bound mapper stays space-independent through its x0-space energy.
    """

    w_min: float | None = None
    w_max: float | None = None
    w: float | None = None
    energy: EnergyEstimator | None = None
    transforms: tuple[EnergyTransform, ...] | None = None
    mapper: ScaleMapper | None = None

    def __post_init__(self) -> None:
        mapper = self._resolve_mapper(self._given_range())
        energy = mapper.default_energy() if self.energy is None else self.energy
        if not isinstance(energy, EnergyEstimator):
            raise ConfigError(f"energy: expected an EnergyEstimator such as DeltaSquared(), got {energy!r}")
        transforms = mapper.default_transforms() if self.transforms is None else self.transforms
        if not isinstance(transforms, tuple | list) or not all(isinstance(t, EnergyTransform) for t in transforms):
            raise ConfigError(
                f"transforms: expected a tuple of EnergyTransform such as (MinMax(),), got {transforms!r}"
            )
        transforms = tuple(transforms)
        if mapper.needs_unit_energy and not _ends_in_unit_range(transforms):
            raise ConfigError(
                f"transforms: expected a normalising transform such as MinMax() before {type(mapper).__name__} "
                f"(it maps energy in [0, 1]), got {transforms!r}"
            )
        for name, value in (("w_min", mapper.w_min), ("w_max", mapper.w_max), ("w", None)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "energy", energy)
        object.__setattr__(self, "transforms", transforms)
        object.__setattr__(self, "mapper", mapper)

    def _given_range(self) -> tuple[float, float] | None:
        """The range set through ``w_min``/``w_max`` or ``w``, or ``None``."""
        if self.w is not None:
            if self.w_min is not None or self.w_max is not None:
                raise ConfigError(
                    f"w: expected either w or w_min/w_max, got w={self.w!r}, w_min={self.w_min!r}, w_max={self.w_max!r}"
                )
            w = check_number("w", self.w)
            if w <= 0:
                raise ConfigError(f"w: expected a positive base scale, got {self.w!r}")
            return range_from_scale(w)
        if self.w_min is None and self.w_max is None:
            return None
        for name, other in (("w_min", "w_max"), ("w_max", "w_min")):
            if getattr(self, name) is None:
                raise ConfigError(f"{name}: expected a number when {other} is given, got None")
        return check_number("w_min", self.w_min), check_number("w_max", self.w_max)

    def _resolve_mapper(self, given: tuple[float, float] | None) -> ScaleMapper:
        if self.mapper is None:
            return LinearMapper(*(given or DEFAULT_RANGE))
        if not isinstance(self.mapper, ScaleMapper):
            raise ConfigError(f"mapper: expected a ScaleMapper such as LinearMapper(5, 12), got {self.mapper!r}")
        if given is not None and given != (self.mapper.w_min, self.mapper.w_max):
            fix = dataclasses.replace(self.mapper, w_min=given[0], w_max=given[1])
            raise ConfigError(
                f"w_min, w_max: expected None or the mapper's range [{self.mapper.w_min}, {self.mapper.w_max}], "
                f"got [{given[0]}, {given[1]}] (set the range on the mapper: {fix!r})"
            )
        return self.mapper

    # -- the combine ----------------------------------------------------------------------------
    def needs_uncond(self, ctx: GuidanceContext) -> bool:
        return not (self.w_min == self.w_max == 1.0)

    def combine(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        if not self.needs_uncond(ctx):
            return pred_cond
        return cfg(pred_cond, pred_uncond, self._scale_map(pred_cond, pred_uncond, ctx))

    def scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        """Ω, ``(b, 1, *spatial)``, float32 (float64 for float64 inputs), values in ``[w_min, w_max]``."""
        check_pair(pred_cond, pred_uncond)
        return self._scale_map(pred_cond, pred_uncond, ctx)

    def _scale_map(self, pred_cond: Tensor, pred_uncond: Tensor, ctx: GuidanceContext) -> Tensor:
        mapper: ScaleMapper = self.mapper  # type: ignore[assignment]  # resolved in __post_init__
        if self._is_default_pipeline():  # DeltaSquared -> MinMax -> LinearMapper: the fused path, tested equal
            minmax: MinMax = self.transforms[0]  # type: ignore[index]
            return samg_scale_map(
                pred_cond, pred_uncond, mapper.w_min, mapper.w_max, mapper.decreasing, minmax.over, minmax.tau
            )
        energy = self.energy(pred_cond, pred_uncond, ctx)  # type: ignore[misc]
        expected = (pred_cond.shape[0], 1, *pred_cond.shape[2:])
        if tuple(energy.shape) != expected:
            raise ShapeError(
                f"energy: expected {type(self.energy).__name__} to return {expected}, got {tuple(energy.shape)}"
            )
        for transform in self.transforms or ():
            energy = transform(energy, ctx)
        return mapper(energy, ctx)

    def _is_default_pipeline(self) -> bool:
        transforms = self.transforms or ()
        return (
            type(self.energy) is DeltaSquared
            and len(transforms) == 1
            and type(transforms[0]) is MinMax
            and type(self.mapper) is LinearMapper
        )


def _ends_in_unit_range(transforms: tuple[EnergyTransform, ...]) -> bool:
    unit = False
    for transform in transforms:
        unit = transform.unit_range(unit)
    return unit
