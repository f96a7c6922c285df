"""Pure math of the guidance catalogue: CFG++, ADG, TCFG, CFG-Zero*, Adaptive Guidance.

Same conventions as :mod:`guidekit.functional`: tensors are ``(b, c, *spatial)`` of any rank, per-sample
reductions run over all non-batch dims, low precision is upcast (float64 for angles, Gram matrices and
projections) and the result is cast back to the input dtype. No state, no configuration objects.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import upcast

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


def _gram(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(⟨a, a⟩, ⟨a, b⟩, ⟨b, b⟩)`` per sample as ``(b,)`` float64: one BLAS dot per sample and product.

    The dots run in the inputs' precision (float32 for float32 and half inputs) and need no temporary
    tensor; on float32 their error is a few 1e-9 relative to ``Σ |a_i b_i|``. Copying video-sized
    tensors to float64 first costs 10-20x more on CPU (see ``guidekit.functional.apg_from_delta``).
    """
    rows_a, rows_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    dots = [(torch.dot(x, x), torch.dot(x, y), torch.dot(y, y)) for x, y in zip(rows_a, rows_b, strict=True)]
    aa, ab, bb = (torch.stack(list(column)).to(torch.float64) for column in zip(*dots, strict=True))
    return aa, ab, bb


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A ``(b,)`` coefficient in ``like``'s dtype, broadcastable against it."""
    return v.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def _away(c: Tensor, b: Tensor, k: Tensor) -> Tensor:
    """``c - k·b`` with a per-sample ``(b,)`` ``k``, one fused pass (exactly 0 where ``k·b == c``)."""
    return torch.addcmul(c, b, _per_sample(k, c), value=-1.0)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def per_sample_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity per sample over all non-batch dims, ``(b,)`` float64, clamped to ``[-1, 1]``.

    A zero sample has cosine 0 with anything.
    """
    aa, ab, bb = _gram(upcast(a), upcast(b))
    return _ratio(ab, torch.sqrt(aa * bb)).clamp(-1.0, 1.0)


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

    ``perp`` is the part of ``x0_c`` orthogonal to ``x0_u``, ``x0_c - (⟨c, u⟩/‖u‖²) x0_u``, so the output is
    one per-sample combination of the two inputs, computed from three dot products in a single pass. It
    lies in ``span{x0_c, x0_u}`` and ``‖out‖ ≤ √2 ‖x0_c‖``; for small θ it is ``x0_c + w'·perp``, CFG
    without the component along ``x0_u``. ``weight_floor = 0`` and ``scale = 1`` give ``x0_c`` exactly;
    the official code keeps ``1e-3``. Deviations, both numerical guards: the cosine is clamped to
    ``[-1, 1]`` (the official ``acos`` gives NaN when rounding pushes it past 1, e.g. for
    ``x0_c == x0_u``), and the projection divides by ``‖x0_u‖²`` with a zero guard instead of
    ``‖x0_u‖² + 1e-8``, so ``θ = 0`` gives ``x0_c`` exactly.
    """
    c, u = upcast(x0_cond), upcast(x0_uncond)
    cc, cu, uu = _gram(c, u)
    weight = max(scale - 1.0, 0.0) + weight_floor
    theta = torch.acos(_ratio(cu, torch.sqrt(cc * uu)).clamp(-1.0, 1.0))
    theta_w = (weight * theta).clamp(max=max_angle)
    sin_theta = torch.sin(theta)
    small = sin_theta <= 1e-3  # first-order limit sin(w'θ)/sin θ -> w'
    ratio = torch.where(small, weight, torch.sin(theta_w) / torch.where(small, 1.0, sin_theta))
    out = _away(c, u, _ratio(cu, uu))  # perp = c - (⟨c, u⟩/‖u‖²) u, the only full-size temporary
    return out.mul_(_per_sample(ratio, c)).addcmul_(c, _per_sample(torch.cos(theta_w), c)).to(x0_cond.dtype)


def _top_singular_coefficients(p: Tensor, q: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(a_c², a_c a_u, a_u²)`` of the unit top eigenvector of ``[[p, q], [q, r]]`` (float64, per sample).

    With ``d = p - r`` and ``h = sqrt(d² + 4q²)``: ``a_c a_u = q / h``, ``a_u² = (h - d) / 2h`` and
    ``a_c² = (h + d) / 2h``, each cancelling form rewritten as ``2q² / (h (h ± d))``. ``h = 0`` (``c ⟂ u``
    with equal norms, or both zero) leaves the top direction undefined; we then keep ``u`` (``a_u = 1``).
    """
    d = p - r
    h = torch.sqrt(d * d + 4.0 * q * q)
    degenerate = h <= 1e-300
    h = torch.where(degenerate, 1.0, h)
    a_uu = torch.where(d > 0, 2.0 * q * q / (h * (h + d)), (h - d) / (2.0 * h))
    a_cc = torch.where(d < 0, 2.0 * q * q / (h * (h - d)), (h + d) / (2.0 * h))
    a_cu = q / h
    return torch.where(degenerate, 0.0, a_cc), torch.where(degenerate, 0.0, a_cu), torch.where(degenerate, 1.0, a_uu)


def tangential_projection(pred_cond: Tensor, pred_uncond: Tensor) -> Tensor:
    """``⟨u, v1⟩ v1`` with ``v1`` the top right-singular vector of the ``(2, N)`` matrix ``[c; u]``.

    TCFG's projection (Kwon et al., CVPR 2025, eq. 8; diffusers ``normalized_guidance``), computed from the
    2x2 Gram matrix ``G = [[‖c‖², ⟨c, u⟩], [⟨c, u⟩, ‖u‖²]]`` instead of an SVD: with ``(a_c, a_u)`` the unit
    top eigenvector of ``G``, ``v1 ∝ a_c c + a_u u`` and ``⟨u, v1⟩ v1 = a_u (a_c c + a_u u)``
    (:func:`_top_singular_coefficients`). Three dot products and one pass, no division by a singular value.
    """
    c, u = upcast(pred_cond), upcast(pred_uncond)
    _, a_cu, a_uu = _top_singular_coefficients(*_gram(c, u))
    return torch.mul(c, _per_sample(a_cu, c)).addcmul_(u, _per_sample(a_uu, c)).to(pred_cond.dtype)


def tcfg(pred_cond: Tensor, pred_uncond: Tensor, scale: float) -> Tensor:
    """Tangential-damping CFG, ``u' + w (c - u') = c + (w - 1)(c - u')`` with ``u' = a_u (a_c c + a_u u)``.

    Two passes after three dot products; ``c == u`` gives ``u' = c`` and the output ``c`` exactly.
    """
    c, u = upcast(pred_cond), upcast(pred_uncond)
    _, a_cu, a_uu = _top_singular_coefficients(*_gram(c, u))
    out = torch.mul(c, _per_sample(1.0 - a_cu, c)).addcmul_(u, _per_sample(a_uu, c), value=-1.0)  # c - u'
    return out.mul_(scale - 1.0).add_(c).to(pred_cond.dtype)


def cfg_zero_star_scale(pred_cond: Tensor, pred_uncond: Tensor) -> Tensor:
    """``s* = ⟨c, u⟩ / ‖u‖²`` per sample, ``(b,)`` float64 (Fan et al. 2025, eq. 8); 0 where ``u = 0``.

    The official code divides by ``‖u‖² + 1e-8``; we guard the zero norm instead, so ``u = c`` gives
    ``s* = 1`` exactly (relative difference ``1e-8 / ‖u‖²``, far below float32 precision for real models).
    """
    _, cu, uu = _gram(upcast(pred_cond), upcast(pred_uncond))
    return _ratio(cu, uu)


def cfg_zero_star(pred_cond: Tensor, pred_uncond: Tensor, scale: float, scaled_shift: bool = True) -> Tensor:
    """CFG-Zero*'s optimised-scale guidance (Fan et al. 2025, eq. 9; WeichenFan/CFG-Zero-star).

    ``scaled_shift=True`` (official, and diffusers >= 0.34): ``s*·u + w (c - s*·u) = c + (w - 1)(c - s*·u)``.
    ``scaled_shift=False``: ``s*·u + w (c - u) = c + (w - 1)(c - u) - (1 - s*) u``, the rule of diffusers'
    first guider (commit 05d74ef3). Two passes after two dot products; ``u = a·c`` gives ``c`` exactly.
    """
    c, u = upcast(pred_cond), upcast(pred_uncond)
    _, cu, uu = _gram(c, u)
    s = _ratio(cu, uu)
    if scaled_shift:
        return _away(c, u, s).mul_(scale - 1.0).add_(c).to(pred_cond.dtype)
    out = torch.sub(c, u).mul_(scale - 1.0).add_(c).addcmul_(u, _per_sample(1.0 - s, c), value=-1.0)
    return out.to(pred_cond.dtype)
