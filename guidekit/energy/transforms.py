"""Energy transforms ``(energy, ctx) -> energy``: normalisation, smoothing, quantile clipping (methods.md §3.4)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..component import Component
from ..context import GuidanceContext
from ..errors import ConfigError
from ..ops.checks import check_choice, check_number
from ..ops.energy import DEFAULT_TAU, Normalization, gaussian_smooth, minmax_normalize, quantile_clip
from ..registry import TRANSFORMS

__all__ = ["EnergyTransform", "GaussianSmooth", "MinMax", "QuantileClip"]


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


@TRANSFORMS.register("minmax")
@dataclass(frozen=True)
class MinMax(EnergyTransform):
    """Min-max normalisation ``Ê = (E - min E) / (max E - min E + tau · max E)`` into ``[0, 1]`` (§3.2).

    Args:
        over: ``"sample"``: min and max over the whole sample, all frames of a video clip together (the
            default; one consistent scale range per clip); ``"frame"``: per frame of a ``(b, c, f, h, w)``
            latent (each frame gets the full ``[w_min, w_max]`` range; can flicker). Latents without a frame
            axis (images) are one frame.
        tau: guard relative to ``max E`` (comfy-cfg-megapack uses an absolute ``1e-8``); relative makes the
            result exactly invariant to scaling the energy. Uniform energy gives ``Ê = 0``. The default 1e-3
            keeps float rounding noise of a (nearly) uniform energy from spanning the range
            (:data:`~guidekit.ops.energy.DEFAULT_TAU`).
    """

    over: Normalization = "sample"
    tau: float = DEFAULT_TAU

    def __post_init__(self) -> None:
        check_choice("over", self.over, ("sample", "frame"))
        object.__setattr__(self, "tau", check_number("tau", self.tau, low=0.0))

    def __call__(self, energy: Tensor, ctx: GuidanceContext) -> Tensor:
        return minmax_normalize(energy, self.over, self.tau)

    def unit_range(self, unit_in: bool) -> bool:
        return True


@TRANSFORMS.register("gaussian-smooth")
@dataclass(frozen=True)
class GaussianSmooth(EnergyTransform):
    """Gaussian blur of the energy over ``(h, w)``, each frame alone, with reflect padding (1-D data: over ``l``).

    Not in the known SAMG rule (methods.md §3.2 has no smoothing); an option for a less noisy scale map.

    Args:
        sigma: standard deviation in latent pixels; 0 = no smoothing.
        truncate: kernel radius in sigmas, ``r = int(truncate · sigma + 0.5)`` (as scipy.ndimage).
    """

    sigma: float = 1.0
    truncate: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", check_number("sigma", self.sigma, low=0.0))
        object.__setattr__(self, "truncate", check_number("truncate", self.truncate, low=0.0))

    def __call__(self, energy: Tensor, ctx: GuidanceContext) -> Tensor:
        return gaussian_smooth(energy, self.sigma, self.truncate)

    def unit_range(self, unit_in: bool) -> bool:
        return unit_in  # convex weights: the output stays in the input's range


@TRANSFORMS.register("quantile-clip")
@dataclass(frozen=True)
class QuantileClip(EnergyTransform):
    """Clamp the energy to its per-sample quantiles ``[Q_{q_lo}(E), Q_{q_hi}(E)]``.

    A transform of the *energy*, not of the guided output: a few outlier points no longer squash the
    min-max range of everything else. Put it before :class:`MinMax`.

    Args:
        q_lo: lower quantile in ``[0, 1]``; 0 keeps the minimum.
        q_hi: upper quantile in ``[q_lo, 1]``; 1 keeps the maximum.
    """

    q_lo: float = 0.01
    q_hi: float = 0.99

    def __post_init__(self) -> None:
        q_lo = check_number("q_lo", self.q_lo, low=0.0, high=1.0)
        q_hi = check_number("q_hi", self.q_hi, low=0.0, high=1.0)
        if q_lo > q_hi:
            raise ConfigError(f"q_lo, q_hi: expected q_lo <= q_hi, got q_lo={q_lo} > q_hi={q_hi}")
        object.__setattr__(self, "q_lo", q_lo)
        object.__setattr__(self, "q_hi", q_hi)

    def __call__(self, energy: Tensor, ctx: GuidanceContext) -> Tensor:
        return quantile_clip(energy, self.q_lo, self.q_hi)

    def unit_range(self, unit_in: bool) -> bool:
        return unit_in  # the output stays in the input's range
