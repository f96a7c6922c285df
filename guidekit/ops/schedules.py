"""Guidance-scale schedules as pure functions of the step, the progress or the sigma schedule.

The schedule combinators in :mod:`guidekit.strategies` (``TVCFG``, ``Ramp``, ``DynamicCFG``,
``ScaleFunction``) call these and run their inner strategy with the resulting scale. Timestep
conventions (trailing, flow time) come from :mod:`guidekit.ops.timesteps` and :mod:`guidekit.ops.spaces`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "cogvideox_dynamic_scale",
    "ramp_scale",
    "sigma_bump",
    "tvcfg_scales",
]

RampShape = Literal["linear", "cosine"]
RampReading = Literal["A", "B"]


def tvcfg_scales(mean_scale: float, times: Tensor) -> Tensor:
    """TV-CFG's stage-wise triangular schedule (Jin, Shi & Gu, ICLR 2026; sqt24/tvcfg ``symmetric``).

    ``times`` are the ``N + 1`` step times ``t_0 > ... > t_N = 0``; they are normalised by ``t_0``. The
    triangle rises linearly from ``low = 1`` to ``high = 2w̄ - 1`` at index ``⌊N/2⌋`` and falls back to
    ``low`` at the last step; it is then rescaled so that its time-weighted mean ``Σ w_i Δt_i`` is ``w̄``.

    Returns:
        ``(N,)`` float64 scales, one per step.
    """
    t = times.to(torch.float64)
    t = t / t[0]
    dt = t[:-1] - t[1:]
    n = dt.numel()
    low, high = 1.0, 2.0 * mean_scale - 1.0
    half = n // 2
    if n % 2 == 0:
        up = torch.linspace(low, high, half + 1, dtype=torch.float64)[:-1]  # endpoint=False
        down = torch.linspace(high, low, half, dtype=torch.float64)
    else:
        up = torch.linspace(low, high, half + 1, dtype=torch.float64)
        down = torch.linspace(high, low, half + 1, dtype=torch.float64)[1:]
    tri = torch.cat([up, down])
    return tri * mean_scale / (tri * dt).sum()


def ramp_scale(mean_scale: float, progress: float, shape: RampShape = "linear", reading: RampReading = "A") -> float:
    """Monotone increasing schedules of Wang et al. (TMLR 2024, "Analysis of CFG weight schedulers").

    ``ramp(τ)`` is ``2τ`` (linear) or ``1 - cos πτ`` (cosine); both have mean 1 over ``τ ∈ [0, 1]``
    (τ = 0 noisiest). Reading A (default) ramps the guidance term, ``1 + ramp(τ)(w̄ - 1)``; reading B ramps
    the scale, ``ramp(τ) w̄``. The paper is ambiguous between the two (methods.md §9.9).
    """
    ramp = 2.0 * progress if shape == "linear" else 1.0 - math.cos(math.pi * progress)
    return 1.0 + ramp * (mean_scale - 1.0) if reading == "A" else ramp * mean_scale


def cogvideox_dynamic_scale(scale: float, position: float, exponent: float = 5.0) -> float:
    """CogVideoX's dynamic CFG, ``1 + w (1 - cos(π · position^exponent)) / 2``.

    diffusers' ``CogVideoXPipeline(use_dynamic_cfg=True)`` (and the SAT code) pass
    ``position = (N - t) / N`` with ``t`` the *scheduler timestep* (0-999), not the step index; see
    :class:`guidekit.strategies.DynamicCFG` for both readings.
    """
    return 1.0 + scale * (1.0 - math.cos(math.pi * position**exponent)) / 2.0


def sigma_bump(sigma: float) -> float:
    """``1 + 4σ / (1 + σ²)``: 3 at ``σ = 1``, falling to 1 at both ends of the schedule.

    A ready-made target for :class:`guidekit.strategies.ScaleFunction`
    (``function="sigma-bump"``, its registered name): guidance concentrated in the middle of the noise
    range, like TV-CFG's triangle, but as a function of sigma alone. ``σ = inf`` gives 1.
    """
    if math.isinf(sigma):
        return 1.0
    return 1.0 + 4.0 * sigma / (1.0 + sigma * sigma)
