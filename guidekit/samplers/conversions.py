"""Pure conversions between noise parameterisations and prediction spaces (methods.md §2).

Every noisy sample is ``x = A · x0 + B · eps`` for some path:

* EDM / VE (the canonical coordinates of guidekit): ``x = x0 + sigma · eps`` (``A = 1, B = sigma``);
* VP (DDPM, SD): ``x_vp = alpha · x0 + sigma_vp · eps`` with ``alpha = 1 / sqrt(1 + sigma^2)``,
  ``sigma_vp = sigma · alpha`` and ``alphas_cumprod = alpha^2``;
* rectified flow (diffusers): ``x_t = (1 - t) · x0 + t · eps`` with ``t = sigma / (1 + sigma)``.

All three share the signal-to-noise ratio ``1 / sigma^2``, so ``x_vp = alpha · x`` and ``x_t = (1 - t) · x``.

Singular points, handled here once:

* ``sigma = 0`` (the end of every schedule): ``x0 = x`` whatever the prediction; ``eps`` is undefined and
  :func:`eps_from_x0` returns 0 there. Samplers never evaluate a model at ``sigma = 0``.
* ``sigma = inf`` (flow ``t = 1``, VP zero terminal SNR): EDM coordinates blow up, so **at sigma = inf an
  EDM ``x`` holds the limit ``x / sigma``** (the unit-variance noise, equal to ``x_vp`` and ``x_t`` there).
  An eps prediction does not determine ``x0`` at ``sigma = inf``; :func:`x0_from_eps` raises there.

Per-sample ``sigma`` tensors have shape ``(b,)`` and broadcast over ``(b, c, *spatial)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..context import PredictionSpace
from ..errors import ConfigError, NonFiniteError
from ..layout import append_dims

__all__ = [
    "alphas_cumprod_from_sigma",
    "convert",
    "eps_from_x0",
    "flow_t_from_sigma",
    "flow_x",
    "from_x0",
    "sigma_from_alphas_cumprod",
    "sigma_from_flow_t",
    "to_x0",
    "vp_alpha",
    "vp_sigma",
    "vp_sigma_from_timestep",
    "vp_timestep_from_sigma",
    "vp_x",
    "x0_from_eps",
    "x_for_space",
]

SPACES: tuple[PredictionSpace, ...] = ("x0", "eps", "v", "flow")


# -- noise levels ------------------------------------------------------------------------------------
def vp_alpha(sigma: Tensor) -> Tensor:
    """``alpha = sqrt(alphas_cumprod) = 1 / sqrt(1 + sigma^2)``: 1 at sigma = 0, 0 at sigma = inf."""
    return torch.rsqrt(1.0 + sigma * sigma)


def vp_sigma(sigma: Tensor) -> Tensor:
    """``sigma_vp = sqrt(1 - alphas_cumprod) = sigma / sqrt(1 + sigma^2)``: 0 at sigma = 0, 1 at inf."""
    return torch.rsqrt(1.0 + 1.0 / (sigma * sigma))


def sigma_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """EDM ``sigma = sqrt((1 - acp) / acp)``; ``acp = 0`` (zero terminal SNR) gives ``inf``."""
    return torch.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def alphas_cumprod_from_sigma(sigma: Tensor) -> Tensor:
    """``acp = 1 / (1 + sigma^2)``, the inverse of :func:`sigma_from_alphas_cumprod`."""
    return 1.0 / (1.0 + sigma * sigma)


def flow_t_from_sigma(sigma: Tensor) -> Tensor:
    """Flow time ``t = sigma / (1 + sigma)``: 0 at sigma = 0, 1 at sigma = inf."""
    return 1.0 / (1.0 + 1.0 / sigma)


def sigma_from_flow_t(t: Tensor) -> Tensor:
    """EDM ``sigma = t / (1 - t)``: 0 at t = 0, ``inf`` at t = 1."""
    return t / (1.0 - t)


def _log_sigmas(alphas_cumprod: Tensor) -> Tensor:
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
    log_sigmas = _log_sigmas(alphas_cumprod)
    t = torch.as_tensor(t, dtype=torch.float64)
    last = log_sigmas.numel() - 1
    if not bool(((t >= 0) & (t <= last)).all()):
        raise ConfigError(f"t: expected training timesteps in [0, {last}], got values in [{t.min()}, {t.max()}]")
    lo = t.floor().long().clamp(max=last - 1)
    w = t - lo
    mixed = (1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]
    return torch.exp(torch.where(w == 0, log_sigmas[lo], mixed))  # w == 0: no 0 · inf at a zero-SNR end


def vp_timestep_from_sigma(sigma: Tensor, alphas_cumprod: Tensor, *, rtol: float = 1e-4) -> Tensor:
    """The fractional training timestep of EDM ``sigma`` (inverse of :func:`vp_sigma_from_timestep`).

    ``sigma`` must lie in the model's range ``[sigma(0), sigma(T-1)]``; values outside by more than a
    relative ``rtol`` (float rounding) raise :class:`ConfigError` instead of being clipped. Returns float64.
    """
    return timestep_from_log_sigmas(sigma, _log_sigmas(alphas_cumprod), rtol=rtol)


def timestep_from_log_sigmas(sigma: Tensor, log_sigmas: Tensor, *, rtol: float = 1e-4) -> Tensor:
    """:func:`vp_timestep_from_sigma` with the grid's ``log sigma`` precomputed (adapters cache it)."""
    log_sigmas = log_sigmas.to(sigma.device)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=log_sigmas.device)
    lo_s, hi_s = log_sigmas[0].exp(), log_sigmas[-1].exp()
    if not bool(((s >= lo_s * (1 - rtol)) & (s <= hi_s * (1 + rtol))).all()):
        raise ConfigError(
            f"sigma: expected values in the model's range [{float(lo_s):.6g}, {float(hi_s):.6g}] "
            f"(alphas_cumprod), got values in [{float(s.min()):.6g}, {float(s.max()):.6g}]"
        )
    log_s = s.log().clamp(log_sigmas[0], log_sigmas[-1]).reshape(-1)  # only float rounding is clamped (checked)
    idx = torch.searchsorted(log_sigmas, log_s, right=True).clamp(1, log_sigmas.numel() - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    w = torch.where(torch.isinf(hi), torch.zeros_like(lo), (log_s - lo) / (hi - lo))
    t = (idx - 1).to(torch.float64) + w.clamp(0, 1)
    t = torch.where(torch.isinf(s.reshape(-1)) & torch.isinf(hi), torch.full_like(t, log_sigmas.numel() - 1), t)
    return t.reshape(s.shape)


# -- coordinates ---------------------------------------------------------------------------------------
def _per_sample(sigma: Tensor, x: Tensor) -> Tensor:
    return append_dims(sigma.to(device=x.device, dtype=_compute_dtype(x)), x.ndim)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _regular(s: Tensor) -> bool:
    """All per-sample sigmas finite and positive: the formulas need no guard (the common, fast path)."""
    return bool(((s > 0) & (s < torch.inf)).all())


def vp_x(x: Tensor, sigma: Tensor) -> Tensor:
    """EDM ``x`` -> VP ``x_vp = alpha · x`` (at sigma = inf, ``x`` already holds the limit)."""
    s = _per_sample(sigma, x)
    if _regular(s):
        return (vp_alpha(s) * x).to(x.dtype)
    return torch.where(torch.isinf(s), x, vp_alpha(s) * x).to(x.dtype)


def flow_x(x: Tensor, sigma: Tensor) -> Tensor:
    """EDM ``x`` -> flow ``x_t = (1 - t) · x = x / (1 + sigma)`` (at sigma = inf, ``x`` is the limit)."""
    s = _per_sample(sigma, x)
    if _regular(s):
        return (x / (1.0 + s)).to(x.dtype)
    return torch.where(torch.isinf(s), x, x / (1.0 + s)).to(x.dtype)


def edm_x_from(x_native: Tensor, sigma: Tensor, coords: Literal["edm", "vp", "flow"]) -> Tensor:
    """Inverse of :func:`vp_x` / :func:`flow_x`: native coordinates -> EDM ``x``."""
    s = _per_sample(sigma, x_native)
    if coords == "edm":
        return x_native
    scale = torch.sqrt(1.0 + s * s) if coords == "vp" else 1.0 + s
    if _regular(s):
        return (x_native * scale).to(x_native.dtype)
    return torch.where(torch.isinf(s), x_native, x_native * scale).to(x_native.dtype)


def x_for_space(x: Tensor, sigma: Tensor, space: PredictionSpace) -> Tensor:
    """The noisy sample in the coordinates a space's formulas use: ``v`` -> VP, ``flow`` -> flow, else EDM."""
    if space == "v":
        return vp_x(x, sigma)
    if space == "flow":
        return flow_x(x, sigma)
    return x


# -- predictions (all at the same x) ---------------------------------------------------------------------
def x0_from_eps(eps: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """``x0 = x - sigma · eps`` (EDM); ``x`` at sigma = 0. Undefined at sigma = inf (raises)."""
    s = _per_sample(sigma, x)
    if bool(torch.isinf(s).any()):
        raise NonFiniteError(
            "sigma: an eps prediction does not determine x0 at sigma = inf (zero terminal SNR / flow t = 1); "
            "expected a finite sigma, got inf (use a v, flow or x0 model, or start the schedule below inf)"
        )
    return (x - s * eps).to(eps.dtype)


def eps_from_x0(x0: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """``eps = (x - x0) / sigma`` (EDM, also the Euler derivative ``d``); ``x`` at inf, 0 at sigma = 0."""
    s = _per_sample(sigma, x)
    if _regular(s):
        return ((x - x0) / s).to(x0.dtype)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    eps = torch.where(torch.isinf(s), x.to(s.dtype), (x - x0) / safe)
    return torch.where(s == 0, torch.zeros_like(eps), eps).to(x0.dtype)


def to_x0(pred: Tensor, space: PredictionSpace, x: Tensor, sigma: Tensor) -> Tensor:
    """The ``x0`` implied by a prediction in ``space`` at EDM ``(x, sigma)`` (methods.md §2 table)."""
    if space == "x0":
        return pred
    if space == "eps":
        return x0_from_eps(pred, x, sigma)
    s = _per_sample(sigma, x)
    if space == "v":  # x0 = alpha · x_vp - sigma_vp · v
        out = vp_alpha(s) * vp_x(x, sigma) - vp_sigma(s) * pred
    elif space == "flow":  # x0 = x_t - t · v
        out = flow_x(x, sigma) - flow_t_from_sigma(s) * pred
    else:
        raise ConfigError(f"space: expected one of {SPACES}, got {space!r}")
    return out.to(pred.dtype)


def from_x0(x0: Tensor, space: PredictionSpace, x: Tensor, sigma: Tensor) -> Tensor:
    """The prediction in ``space`` that implies ``x0`` at EDM ``(x, sigma)`` (inverse of :func:`to_x0`)."""
    if space == "x0":
        return x0
    eps = eps_from_x0(x0, x, sigma)
    if space == "eps":
        return eps
    s = _per_sample(sigma, x)
    if space == "v":  # v = alpha · eps - sigma_vp · x0
        return (vp_alpha(s) * eps - vp_sigma(s) * x0).to(x0.dtype)
    if space == "flow":  # v = eps - x0
        return eps - x0
    raise ConfigError(f"space: expected one of {SPACES}, got {space!r}")


def convert(pred: Tensor, src: PredictionSpace, dst: PredictionSpace, x: Tensor, sigma: Tensor) -> Tensor:
    """A prediction in ``src`` expressed in ``dst`` at the same EDM ``(x, sigma)``.

    Affine per sample, with the same coefficients for every prediction at that point (the linearity
    lemma of methods.md §2). ``v``/``flow`` -> ``eps`` use the direct formulas (no division by sigma).
    """
    if src == dst:
        return pred
    if dst == "eps" and src in ("v", "flow"):
        s = _per_sample(sigma, x)
        if src == "v":  # eps = sigma_vp · x_vp + alpha · v
            return (vp_sigma(s) * vp_x(x, sigma) + vp_alpha(s) * pred).to(pred.dtype)
        return (flow_x(x, sigma) + (1.0 - flow_t_from_sigma(s)) * pred).to(pred.dtype)  # eps = x_t + (1-t) v
    return from_x0(to_x0(pred, src, x, sigma), dst, x, sigma)
