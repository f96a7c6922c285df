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

import math
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError, NonFiniteError
from .shapes import append_dims, compute_dtype

__all__ = [
    "SPACES",
    "PredictionSpace",
    "alphas_cumprod_from_sigma",
    "compute_dtype",
    "convert",
    "edm_x_from",
    "eps_from_x0",
    "flow_t_from_sigma",
    "flow_x",
    "from_x0",
    "sigma_from_alphas_cumprod",
    "sigma_from_flow_t",
    "to_x0",
    "vp_alpha",
    "vp_sigma",
    "vp_x",
    "x0_delta_scale",
    "x0_from_eps",
    "x_for_space",
]

PredictionSpace = Literal["x0", "eps", "v", "flow"]
"""What a prediction tensor means.

* ``x0``: the denoised sample (Karras' ``D(x; sigma)``).
* ``eps``: the noise (VP and EDM/VE share it).
* ``v``: VP v-prediction ``alpha * eps - sigma_vp * x0`` (needs ``alpha^2 + sigma_vp^2 = 1``).
* ``flow``: rectified-flow velocity ``eps - x0`` (diffusers' ``FlowMatchEulerDiscreteScheduler``).
"""

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
    """Flow time ``t = sigma / (1 + sigma)``: 0 at sigma = 0, 1 at sigma = inf.

    The one meaning of "flow time" in guidekit: the ``t`` of ``x_t = (1 - t) · x0 + t · eps`` (diffusers'
    ``FlowMatchEulerDiscreteScheduler.sigmas``), never multiplied by a model's ``time_scale``.
    """
    return 1.0 / (1.0 + 1.0 / sigma)


def sigma_from_flow_t(t: Tensor) -> Tensor:
    """EDM ``sigma = t / (1 - t)``: 0 at t = 0, ``inf`` at t = 1."""
    return t / (1.0 - t)


# -- coordinates ---------------------------------------------------------------------------------------
def _per_sample(sigma: Tensor, x: Tensor) -> Tensor:
    return append_dims(sigma.to(device=x.device, dtype=compute_dtype(x)), x.ndim)


def _regular(s: Tensor) -> bool:
    """All per-sample sigmas finite and positive: the formulas need no guard (the common, fast path).

    One ``aminmax`` and two scalar reads (several element-wise kernels and an ``all`` cost 5x more on the
    small sigma vectors of a sampling loop). NaN makes both comparisons false: not regular.
    """
    if s.numel() == 0:
        return True
    lo, hi = torch.aminmax(s)
    return lo.item() > 0.0 and hi.item() < math.inf


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


def x0_delta_scale(space: PredictionSpace, sigma: Tensor) -> Tensor:
    """Per-sample ``k`` with ``Δx0 = k · Δpred`` at a fixed ``x_t`` (methods.md §2).

    Every conversion between spaces is affine with coefficients shared by the conditional and the
    unconditional prediction, so a *difference* of predictions converts by one scalar per sample:
    eps ``-sigma``; VP v ``-sigma / sqrt(1 + sigma^2)`` (``-vp_sigma``); flow ``-t = -sigma / (1 + sigma)``;
    x0 ``1``. At sigma = inf (flow t = 1, zero terminal SNR) v and flow give the limit -1, not NaN.
    """
    sigma = sigma.to(torch.float32)
    if space == "x0":
        return torch.ones_like(sigma)
    if space == "eps":
        return -sigma
    if space == "v":
        return -vp_sigma(sigma)
    if space == "flow":
        return -flow_t_from_sigma(sigma)
    raise ValueError(f"space: expected one of 'x0', 'eps', 'v', 'flow', got {space!r}")
