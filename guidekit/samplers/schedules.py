"""Noise schedules. Every function returns EDM sigmas, shape ``(steps + 1,)``, decreasing, ending at 0.

A sampler takes such a tensor and nothing else; VP timesteps and flow times are derived from it with
:mod:`guidekit.samplers.conversions` (``sigma_from_flow_t`` / ``flow_t_from_sigma``,
``vp_timestep_from_sigma``). A flow schedule that starts at ``t = 1`` starts at ``sigma = inf``.
Schedules are float64 on the CPU; samplers move them to the sample's device.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from .conversions import _log_sigmas, sigma_from_flow_t, vp_sigma_from_timestep

__all__ = [
    "betas_linear",
    "betas_scaled_linear",
    "flow_sigmas",
    "flow_times",
    "karras_sigmas",
    "vp_sigmas",
    "vp_timesteps",
]

Spacing = Literal["leading", "trailing", "linspace"]


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps: expected an integer >= 1, got {steps!r}")


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), eq. 5: ``(sigma_max^(1/rho) + i/(n-1) · (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.

    Defaults are EDM's (``sigma_min = 0.002``, ``sigma_max = 80``, ``rho = 7``). ``steps = 1`` gives
    ``[sigma_max, 0]``.
    """
    _check_steps(steps)
    if not (0 < sigma_min < sigma_max < float("inf")):
        raise ConfigError(
            f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}"
        )
    if not rho > 0:
        raise ConfigError(f"rho: expected a positive number, got {rho!r}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def betas_linear(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear beta schedule (Ho et al. 2020); ``alphas_cumprod = cumprod(1 - betas)``."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def betas_scaled_linear(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Stable Diffusion's ``scaled_linear`` betas: linear in ``sqrt(beta)``."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def vp_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing = "leading", steps_offset: int = 0) -> Tensor:
    """The sampling timesteps of diffusers' DDIM/DDPM schedulers, decreasing (float64, possibly fractional).

    ``leading``: ``arange(n) · (T // n) + steps_offset`` (SD1.x uses ``steps_offset = 1``); ``trailing``:
    ``round(arange(T, 0, -T/n)) - 1`` (reaches ``T - 1``; "Common diffusion noise schedules are flawed");
    ``linspace``: ``linspace(0, T - 1, n)`` without rounding (as diffusers' Euler scheduler).
    """
    _check_steps(steps)
    if steps > num_train_timesteps:
        raise ConfigError(f"steps: expected at most num_train_timesteps = {num_train_timesteps}, got {steps}")
    n, total = steps, num_train_timesteps
    if spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (total // n) + steps_offset
    elif spacing == "trailing":
        t = torch.round(torch.arange(total, 0, -total / n, dtype=torch.float64)) - 1
    elif spacing == "linspace":
        t = torch.linspace(0, total - 1, n, dtype=torch.float64)
    else:
        raise ConfigError(f"spacing: expected one of 'leading', 'trailing', 'linspace', got {spacing!r}")
    t = t.sort(descending=True).values
    if bool((t > total - 1).any()) or bool((t < 0).any()):
        raise ConfigError(f"steps_offset: expected timesteps within [0, {total - 1}], got max {float(t.max())}")
    return t


def vp_sigmas(alphas_cumprod: Tensor, steps: int, spacing: Spacing = "leading", steps_offset: int = 0) -> Tensor:
    """EDM sigmas of a VP model at diffusers' DDIM timesteps (see :func:`vp_timesteps`), then 0.

    At integer timesteps ``sigma = sqrt((1 - acp_t) / acp_t)`` exactly; between grid points ``log sigma`` is
    interpolated (``linspace`` spacing). The final 0 is DDIM's ``set_alpha_to_one=True`` end.
    """
    log_sigmas = _log_sigmas(alphas_cumprod)
    t = vp_timesteps(log_sigmas.numel(), steps, spacing, steps_offset)
    return _append_zero(vp_sigma_from_timestep(t, alphas_cumprod))


def flow_times(steps: int, *, shift: float = 1.0, t_max: float = 1.0, t_min: float | None = None) -> Tensor:
    """Rectified-flow times: ``linspace(t_max, t_min, n)`` then the SD3 shift ``s·t / (1 + (s - 1)·t)``, then 0.

    ``t_min = None`` gives ``t_max / n``: the schedule of diffusers' SD3 pipeline
    (``sigmas = linspace(1, 1/n, n)`` passed to ``FlowMatchEulerDiscreteScheduler`` with ``shift``).
    """
    _check_steps(steps)
    t_min = t_max / steps if t_min is None else t_min
    if not (0 < t_min <= t_max <= 1):
        raise ConfigError(f"t_min, t_max: expected 0 < t_min <= t_max <= 1, got {t_min}, {t_max}")
    if not shift > 0:
        raise ConfigError(f"shift: expected a positive number, got {shift!r}")
    t = torch.linspace(t_max, t_min, steps, dtype=torch.float64)
    t = t / (t + (1 - t) / shift)  # = shift·t / (1 + (shift - 1)·t), exact at t = 1
    return _append_zero(t)


def flow_sigmas(steps: int, *, shift: float = 1.0, t_max: float = 1.0, t_min: float | None = None) -> Tensor:
    """:func:`flow_times` as EDM sigmas ``t / (1 - t)`` (``t = 1`` gives ``inf``)."""
    return sigma_from_flow_t(flow_times(steps, shift=shift, t_max=t_max, t_min=t_min))
