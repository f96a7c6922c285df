"""Timestep conventions and noise schedules: trailing, leading, linspace, Karras and flow, each once.

Every ``*_sigmas`` function returns EDM sigmas, shape ``(steps + 1,)``, decreasing, ending at 0. A sampler
takes such a tensor and nothing else. VP training timesteps and EDM sigmas convert both ways through the
``log sigma`` grid of ``alphas_cumprod`` (:func:`vp_sigma_from_timestep`, :func:`vp_timestep_from_sigma`);
flow times through :func:`guidekit.ops.spaces.flow_t_from_sigma` / ``sigma_from_flow_t``. A flow schedule
that starts at ``t = 1`` starts at ``sigma = inf``. Schedules are float64 on the CPU; samplers move them
to the sample's device.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .spaces import sigma_from_alphas_cumprod, sigma_from_flow_t

__all__ = [
    "betas_linear",
    "betas_scaled_linear",
    "flow_sigmas",
    "flow_times",
    "karras_sigmas",
    "log_sigmas",
    "timestep_from_log_sigmas",
    "trailing_timestep",
    "vp_sigma_from_timestep",
    "vp_sigmas",
    "vp_timestep_from_sigma",
    "vp_timesteps",
]

Spacing = Literal["leading", "trailing", "linspace"]


# -- VP training timesteps <-> EDM sigma ----------------------------------------------------------
def log_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """``log sigma`` at each training timestep of ``alphas_cumprod`` (float64, checked: 1-D, in [0, 1),
    non-increasing); the grid the VP timestep conversions interpolate on."""
    acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if acp.ndim != 1 or acp.numel() < 2 or not bool(((acp >= 0) & (acp < 1)).all()):
        raise ConfigError(f"alphas_cumprod: expected a 1-D tensor of values in [0, 1), got shape {tuple(acp.shape)}")
    if not bool((acp[1:] <= acp[:-1]).all()):
        raise ConfigError("alphas_cumprod: expected non-increasing values (timestep 0 = least noise)")
    return sigma_from_alphas_cumprod(acp).log()


def vp_sigma_from_timestep(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """EDM sigma at a (possibly fractional) training timestep ``t`` in ``[0, T - 1]``.

    Linear interpolation of ``log sigma`` between grid points (k-diffusion ``DiscreteSchedule.t_to_sigma``,
    the inverse of diffusers' ``_sigma_to_t``). Exact at integer ``t``. Returns float64.
    """
    grid = log_sigmas(alphas_cumprod)
    t = torch.as_tensor(t, dtype=torch.float64)
    last = grid.numel() - 1
    if not bool(((t >= 0) & (t <= last)).all()):
        raise ConfigError(f"t: expected training timesteps in [0, {last}], got values in [{t.min()}, {t.max()}]")
    lo = t.floor().long().clamp(max=last - 1)
    w = t - lo
    mixed = (1 - w) * grid[lo] + w * grid[lo + 1]
    return torch.exp(torch.where(w == 0, grid[lo], mixed))  # w == 0: no 0 · inf at a zero-SNR end


def vp_timestep_from_sigma(sigma: Tensor, alphas_cumprod: Tensor, *, rtol: float = 1e-4) -> Tensor:
    """The fractional training timestep of EDM ``sigma`` (inverse of :func:`vp_sigma_from_timestep`).

    ``sigma`` must lie in the model's range ``[sigma(0), sigma(T-1)]``; values outside by more than a
    relative ``rtol`` (float rounding) raise :class:`ConfigError` instead of being clipped. Returns float64.
    """
    return timestep_from_log_sigmas(sigma, log_sigmas(alphas_cumprod), rtol=rtol)


def timestep_from_log_sigmas(sigma: Tensor, grid: Tensor, *, rtol: float = 1e-4) -> Tensor:
    """:func:`vp_timestep_from_sigma` with the grid's ``log sigma`` precomputed (adapters cache it)."""
    grid = grid.to(sigma.device)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=grid.device)
    lo_s, hi_s = grid[0].exp(), grid[-1].exp()
    s_lo, s_hi = torch.aminmax(s) if s.numel() else (lo_s, hi_s)
    if not (s_lo.item() >= lo_s.item() * (1 - rtol) and s_hi.item() <= hi_s.item() * (1 + rtol)):
        raise ConfigError(
            f"sigma: expected values in the model's range [{float(lo_s):.6g}, {float(hi_s):.6g}] "
            f"(alphas_cumprod), got values in [{float(s.min()):.6g}, {float(s.max()):.6g}]"
        )
    log_s = s.log().clamp(grid[0], grid[-1]).reshape(-1)  # only float rounding is clamped (checked)
    idx = torch.searchsorted(grid, log_s, right=True).clamp(1, grid.numel() - 1)
    lo, hi = grid[idx - 1], grid[idx]
    w = torch.where(torch.isinf(hi), torch.zeros_like(lo), (log_s - lo) / (hi - lo))
    t = (idx - 1).to(torch.float64) + w.clamp(0, 1)
    t = torch.where(torch.isinf(s.reshape(-1)) & torch.isinf(hi), torch.full_like(t, grid.numel() - 1), t)
    return t.reshape(s.shape)


# -- schedules ------------------------------------------------------------------------------


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
    ``round(arange(T, 0, -T/n)) - 1`` (reaches ``T - 1``; "Common diffusion noise schedules are flawed"),
    computed in numpy exactly as diffusers does: numpy's ``arange`` rounding decides the ties (50 step
    counts of 1..1000 differ from torch's ``arange``, e.g. step 3 of 48 is 936, not 937; the first ``n``
    are kept where numpy's ``arange`` yields ``n + 1``);
    ``linspace``: ``linspace(0, T - 1, n)`` without rounding (as diffusers' Euler scheduler).
    """
    _check_steps(steps)
    if steps > num_train_timesteps:
        raise ConfigError(f"steps: expected at most num_train_timesteps = {num_train_timesteps}, got {steps}")
    n, total = steps, num_train_timesteps
    if spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (total // n) + steps_offset
    elif spacing == "trailing":
        # numpy's arange can yield one element too many (e.g. n = 61: a last -1); diffusers keeps n steps
        t = torch.from_numpy(np.round(np.arange(total, 0, -total / n))[:n].astype(np.float64) - 1)
    elif spacing == "linspace":
        t = torch.linspace(0, total - 1, n, dtype=torch.float64)
    else:
        raise ConfigError(f"spacing: expected one of 'leading', 'trailing', 'linspace', got {spacing!r}")
    t = t.sort(descending=True).values
    if bool((t > total - 1).any()) or bool((t < 0).any()):
        raise ConfigError(f"steps_offset: expected timesteps within [0, {total - 1}], got max {float(t.max())}")
    return t


def trailing_timestep(step: int, num_steps: int, num_train_timesteps: int = 1000) -> int:
    """The integer timestep of step ``step`` under diffusers' ``timestep_spacing="trailing"``.

    One entry of :func:`vp_timesteps` (``spacing="trailing"``), e.g. 999, 979, ... for 50 of 1000 steps.
    """
    return int(vp_timesteps(num_train_timesteps, num_steps, "trailing")[step])


def vp_sigmas(alphas_cumprod: Tensor, steps: int, spacing: Spacing = "leading", steps_offset: int = 0) -> Tensor:
    """EDM sigmas of a VP model at diffusers' DDIM timesteps (see :func:`vp_timesteps`), then 0.

    At integer timesteps ``sigma = sqrt((1 - acp_t) / acp_t)`` exactly; between grid points ``log sigma`` is
    interpolated (``linspace`` spacing). The final 0 is DDIM's ``set_alpha_to_one=True`` end.
    """
    t = vp_timesteps(log_sigmas(alphas_cumprod).numel(), steps, spacing, steps_offset)
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
