"""Pure math of the guidance catalogue: CFG++, ADG, TCFG, CFG-Zero*, Adaptive Guidance.

Same conventions as :mod:`guidekit.functional`: tensors are ``(b, c, *spatial)`` of any rank, per-sample
reductions run over all non-batch dims, low precision is upcast (float64 for angles, Gram matrices and
projections) and the result is cast back to the input dtype. No state, no configuration objects.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import cfg, per_sample_dot, upcast
from .layout import append_dims

__all__ = [
    "adg",
    "cfg_zero_star",
    "cfg_zero_star_scale",
    "cfgpp_weight",
    "per_sample_cosine",
    "tangential_projection",
    "tcfg",
]


def cfgpp_weight(lam: float, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The CFG weight that makes one deterministic first-order step equal a CFG++ step (methods.md §7).

    CFG++ (Chung et al., ICLR 2025, Alg. 1) moves to ``x0_λ = D_u + λ (D_c - D_u)`` and re-noises with the
    *unconditional* direction: ``x' = x0_λ + σ' (x - D_u) / σ`` (EDM coordinates; DDIM and flow Euler are
    the same update in other coordinates). Solving ``D_g + σ'(x - D_g)/σ = x'`` for a CFG output ``D_g``
    gives ``D_g = D_u + w_eff (D_c - D_u)`` with ``w_eff = λ σ / (σ - σ')``; ``σ' = 0`` gives ``λ``.

    Args:
        lam: the CFG++ interpolation weight λ (``0`` unconditional, ``1`` conditional x0).
        sigma: ``(b,)`` EDM sigma of the current step, ``> 0`` (``inf`` allowed: ``w_eff = λ``).
        sigma_next: ``(b,)`` EDM sigma the step goes to, ``0 <= sigma_next < sigma``.
    Returns:
        ``(b,)`` float64 weights.
    """
    ratio = sigma_next.to(torch.float64) / sigma.to(torch.float64)  # 0 at sigma = inf (flow t = 1)
    return lam / (1.0 - ratio)


def per_sample_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity per sample over all non-batch dims, ``(b,)`` float64, clamped to ``[-1, 1]``.

    A zero sample has cosine 0 with anything.
    """
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    norms = torch.sqrt(per_sample_dot(a64, a64) * per_sample_dot(b64, b64))
    cos = per_sample_dot(a64, b64) / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return cos.clamp(-1.0, 1.0)


def adg(
    x0_cond: Tensor,
    x0_uncond: Tensor,
    scale: float,
    max_angle: float = 3.14 / 3,
    weight_floor: float = 1e-3,
) -> Tensor:
    """Angle-domain guidance: rotate ``x0_c`` away from ``x0_u`` (Jin et al., ICML 2025, eq. 9; methods.md §8).

    Official rule (jinc7461/ADG ``method/ADG_SD3.py``), per sample over all non-batch dims::

        w'   = max(w - 1, 0) + weight_floor
        θ    = arccos cos(x0_c, x0_u)                       (float64)
        θ_w  = min(w' θ, max_angle)
        perp = (x0_c - x0_u) - proj_{x0_u}(x0_c - x0_u)
        out  = cos θ_w · x0_c + perp · (sin θ_w / sin θ  if sin θ > 1e-3  else  w')

    ``perp`` is the part of ``x0_c`` orthogonal to ``x0_u``, so the output lies in ``span{x0_c, x0_u}`` and
    ``‖out‖ ≤ √2 ‖x0_c‖``. For small θ it is ``x0_c + w'·perp``: CFG without the component along ``x0_u``.
    ``weight_floor = 0`` and ``scale = 1`` give ``x0_c`` exactly; the official code keeps ``1e-3``.
    Deviations, both numerical guards: the cosine is clamped to ``[-1, 1]`` (the official ``acos`` gives
    NaN when rounding pushes it past 1, e.g. for ``x0_c == x0_u``), and the projection divides by
    ``‖x0_u‖²`` with a zero guard instead of ``‖x0_u‖² + 1e-8``, so ``θ = 0`` gives ``x0_c`` exactly.
    """
    shape, dtype = x0_cond.shape, x0_cond.dtype
    c = x0_cond.reshape(shape[0], -1).to(torch.float64)
    u = x0_uncond.reshape(shape[0], -1).to(torch.float64)
    weight = max(scale - 1.0, 0.0) + weight_floor
    theta = torch.acos(per_sample_cosine(c, u))
    theta_w = (weight * theta).clamp(max=max_angle)
    diff = c - u
    uu = per_sample_dot(u, u)
    perp = diff - torch.where(uu > 0, per_sample_dot(diff, u) / torch.where(uu > 0, uu, 1.0), 0.0)[:, None] * u
    sin_theta = torch.sin(theta)
    small = sin_theta <= 1e-3  # first-order limit sin(w'θ)/sin θ -> w'
    ratio = torch.where(small, weight, torch.sin(theta_w) / torch.where(small, 1.0, sin_theta))
    out = torch.cos(theta_w)[:, None] * c + ratio[:, None] * perp
    return out.reshape(shape).to(dtype)


def tangential_projection(pred_cond: Tensor, pred_uncond: Tensor) -> Tensor:
    """``⟨u, v1⟩ v1`` with ``v1`` the top right-singular vector of the ``(2, N)`` matrix ``[c; u]``.

    TCFG's projection (Kwon et al., CVPR 2025, eq. 8; diffusers ``normalized_guidance``), computed from the
    2x2 Gram matrix ``G = [[p, q], [q, r]]`` (``p = ‖c‖², q = ⟨c, u⟩, r = ‖u‖²``, float64) instead of an SVD:
    with ``(a_c, a_u)`` the unit top eigenvector of ``G``, ``v1 ∝ a_c c + a_u u`` and
    ``⟨u, v1⟩ v1 = a_u (a_c c + a_u u)``. With ``h = sqrt((p - r)² + 4q²)``: ``a_c a_u = q / h`` and
    ``a_u² = (h - p + r) / 2h`` (written without cancellation). ``h = 0`` (``c ⟂ u`` with equal norms, or
    both zero) leaves the top direction undefined; we then keep ``u`` (``a_u = 1``).
    """
    shape, dtype = pred_cond.shape, pred_cond.dtype
    c = pred_cond.reshape(shape[0], -1).to(torch.float64)
    u = pred_uncond.reshape(shape[0], -1).to(torch.float64)
    p, q, r = per_sample_dot(c, c), per_sample_dot(c, u), per_sample_dot(u, u)
    d = p - r
    h = torch.sqrt(d * d + 4.0 * q * q)
    degenerate = h <= 1e-300
    h_safe = torch.where(degenerate, 1.0, h)
    # a_u^2 = (h - d) / 2h; for d > 0 use the equal 2q^2 / (h (h + d)), which has no cancellation
    a_u2 = torch.where(d > 0, 2.0 * q * q / (h_safe * (h_safe + d)), (h_safe - d) / (2.0 * h_safe))
    a_cu = q / h_safe
    a_u2 = torch.where(degenerate, 1.0, a_u2)
    a_cu = torch.where(degenerate, 0.0, a_cu)
    out = a_cu[:, None] * c + a_u2[:, None] * u
    return out.reshape(shape).to(dtype)


def tcfg(pred_cond: Tensor, pred_uncond: Tensor, scale: float) -> Tensor:
    """Tangential-damping CFG, ``u' + w (c - u')`` with ``u'`` from :func:`tangential_projection`."""
    return cfg(pred_cond, tangential_projection(pred_cond, pred_uncond), scale)


def cfg_zero_star_scale(pred_cond: Tensor, pred_uncond: Tensor) -> Tensor:
    """``s* = ⟨c, u⟩ / ‖u‖²`` per sample, ``(b,)``, float32 or wider (Fan et al. 2025, eq. 8); 0 where ``u = 0``.

    The official code divides by ``‖u‖² + 1e-8``; we guard the zero norm instead, so ``u = c`` gives
    ``s* = 1`` exactly (relative difference ``1e-8 / ‖u‖²``, far below float32 precision for real models).
    """
    c, u = upcast(pred_cond), upcast(pred_uncond)
    uu = per_sample_dot(u, u)
    return torch.where(uu > 0, per_sample_dot(c, u) / torch.where(uu > 0, uu, 1.0), 0.0)


def cfg_zero_star(pred_cond: Tensor, pred_uncond: Tensor, scale: float, scaled_shift: bool = True) -> Tensor:
    """CFG-Zero*'s optimised-scale guidance (Fan et al. 2025, eq. 9; WeichenFan/CFG-Zero-star).

    ``scaled_shift=True`` (official, and diffusers >= 0.34): ``s*·u + w (c - s*·u)``.
    ``scaled_shift=False``: ``s*·u + w (c - u)``, the rule of diffusers' first guider (commit 05d74ef3).
    """
    s = append_dims(cfg_zero_star_scale(pred_cond, pred_uncond), pred_cond.ndim)
    c, u = upcast(pred_cond), upcast(pred_uncond)
    base = s * u
    out = base + scale * (c - (base if scaled_shift else u))
    return out.to(pred_cond.dtype)
