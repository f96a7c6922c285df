"""The guidance formulas: CFG, projection, APG, rescale, CFG++, ADG, TCFG, CFG-Zero* (pure functions).

No state, no configuration objects: strategies hold parameters and call these. Tensors are
``(b, c, *spatial)`` of any rank; per-sample reductions run over all non-batch dims; low precision is
upcast (float64 for angles, Gram matrices and projections) and the result is cast back to the input dtype.
Fast paths sit next to the plain formula they replace (:func:`apg_from_delta` beside :func:`apg_plain`),
and the tests show they agree. SAMG's energy and scale maps are in :mod:`guidekit.ops.energy`, FDG's
frequency split in :mod:`guidekit.ops.frequency`, the scale schedules in :mod:`guidekit.ops.schedules`.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from .checks import check_pair
from .shapes import append_dims, non_batch_dims, upcast

__all__ = [
    "adg",
    "apg",
    "apg_from_delta",
    "apg_plain",
    "cfg",
    "cfg_zero_star",
    "cfg_zero_star_scale",
    "cfgpp_weight",
    "momentum_update",
    "per_sample_cosine",
    "per_sample_dot",
    "per_sample_norm",
    "project",
    "rescale_std",
    "tangential_projection",
    "tcfg",
]


def cfg(pred_cond: Tensor, pred_uncond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance ``u + w (c - u)`` (Ho & Salimans 2022, eq. 6, Imagen convention).

    ``scale`` is a float or a tensor broadcastable to the predictions (a per-point map in SAMG).
    ``scale == 1`` gives ``pred_cond``; ``scale == 0`` gives ``pred_uncond``.
    """
    if pred_cond.dtype in (torch.float16, torch.bfloat16):
        out = torch.lerp(upcast(pred_uncond), upcast(pred_cond), scale if isinstance(scale, Tensor) else float(scale))
        return out.to(pred_cond.dtype)
    if isinstance(scale, Tensor):
        return torch.lerp(pred_uncond, pred_cond, scale.to(pred_cond.dtype))
    return torch.lerp(pred_uncond, pred_cond, float(scale))


def per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` per sample over all non-batch dims, shape ``(b,)``."""
    return (a * b).sum(dim=non_batch_dims(a))


def per_sample_norm(x: Tensor) -> Tensor:
    """L2 norm per sample over all non-batch dims, shape ``(b,)``."""
    return torch.linalg.vector_norm(x, dim=non_batch_dims(x))


def _flat64(x: Tensor) -> Tensor:
    """``x`` as ``(b, n)`` float64 (the per-sample vectors of the projection math)."""
    return x.flatten(1).to(torch.float64)


def project(x: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``x`` into its parts parallel and orthogonal to ``onto``, per sample.

    APG's projection (Sadat et al., ICLR 2025, §4 and Algorithm 1): ``x_par = <x, ô> ô`` with ``ô = onto / ||onto||``
    over all non-batch dims, and ``x_orth = x - x_par``. Computed in float64 and cast back to ``x.dtype``.
    A sample whose ``onto`` is zero has no parallel part (``x_par = 0``, ``x_orth = x``).

    Returns:
        ``(parallel, orthogonal)``, each shaped like ``x``.
    """
    check_pair(x, onto)
    x64, o64 = _flat64(x), _flat64(onto)
    oo = torch.linalg.vecdot(o64, o64)
    k = torch.where(oo > 0, torch.linalg.vecdot(x64, o64) / oo.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    par64 = k[:, None] * o64
    return par64.to(x.dtype).reshape(x.shape), (x64 - par64).to(x.dtype).reshape(x.shape)


def momentum_update(delta: Tensor, running: Tensor, momentum: float, *, inplace: bool = False) -> Tensor:
    """APG's momentum buffer ``running' = delta + momentum * running`` (Sadat et al. 2025, Algorithm 1).

    ``momentum < 0`` (the paper's choice, -0.5 for SDXL) is *reverse* momentum: it subtracts the previous
    direction, pushing the sampler away from where earlier steps already moved it. ``inplace=True``
    writes the result into ``delta`` (a fresh ``c - u`` the caller owns), saving an allocation.
    """
    if inplace:
        return delta.add_(running, alpha=momentum)
    return torch.add(delta, running, alpha=momentum)


def apg_plain(pred_cond: Tensor, delta: Tensor, scale: float, eta: float = 0.0, norm_threshold: float = 0.0) -> Tensor:
    """APG written as the paper writes it (Sadat et al. 2025, Algorithm 1), the reference of :func:`apg_from_delta`.

    ``Δ ← Δ · min(1, r / ||Δ||)`` (``r = norm_threshold``, 0 disables it), ``(Δ_par, Δ_orth) = project(Δ, c)``,
    ``ĝ = c + (w - 1)(Δ_orth + η Δ_par)``; float64 projection, several full-size temporaries.
    """
    c = upcast(pred_cond)
    d = delta.to(c.dtype)
    if norm_threshold > 0:
        norm = append_dims(per_sample_norm(d), d.ndim)
        d = d * torch.clamp(norm_threshold / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)
    par, orth = project(d, c)
    return (c + (scale - 1.0) * (orth + eta * par)).to(pred_cond.dtype)


def apg_from_delta(
    pred_cond: Tensor, delta: Tensor, scale: float, eta: float = 0.0, norm_threshold: float = 0.0
) -> Tensor:
    """APG's guided prediction from a given update direction ``delta`` (Sadat et al. 2025, Algorithm 1).

    ``ĝ = c + (w - 1)(Δ_orth + η Δ_par)``, where ``Δ`` is first shrunk to norm at most ``norm_threshold``
    (the paper's rescaling; ``0`` disables it) and split by :func:`project` against ``c``. Use
    ``delta = c - u`` for plain APG, or the momentum-averaged direction (:func:`momentum_update`).

    The fast path of :func:`apg_plain` (tested equal): all of it is one per-sample linear combination.
    With ``s = min(1, r / ||Δ||)`` and ``k = <Δ, c> / ||c||²``, ``ĝ = (1 - (w-1) s (1-η) k) c + (w-1) s Δ``.
    The reductions ``||c||², <Δ, c>, ||Δ||²`` are one BLAS dot per sample in the working precision
    (:func:`_gram`: no temporaries; on float32 a few 1e-9 relative to ``sum |c_i Δ_i|``, measured at 1.1M
    elements, while float64 copies of a video latent cost 10-20x more on CPU). The coefficients are float64
    tensors on the device (no host synchronisation, differentiable) and the output is one multiply-add
    pass in the working precision (float32 for half inputs), cast back to ``pred_cond.dtype``.
    """
    c = upcast(pred_cond)
    d = delta.to(c.dtype)
    if norm_threshold > 0:  # s = min(1, r / ||Δ||); a zero Δ gives r · inf -> 1
        cc, dc, dd = _gram(c, d)
        b = torch.rsqrt(dd).mul(norm_threshold).clamp(max=1.0).mul_(scale - 1.0)
    else:
        cc, dc, _ = _gram(c, d, squares_b=False)
        b = torch.full_like(cc, scale - 1.0)
    k = dc / cc.clamp_min(torch.finfo(torch.float64).tiny)  # Δ_par = k·c; a zero c has <Δ, c> = 0: no parallel part
    a = torch.mul(b, k).mul_(eta - 1.0).add_(1.0)  # 1 - (w-1) s (1-η) k
    ab = append_dims(torch.stack((a, b)).to(c.dtype), c.ndim + 1)  # one cast for both coefficients
    return torch.mul(c, ab[0]).addcmul_(d, ab[1]).to(pred_cond.dtype)


def apg(pred_cond: Tensor, pred_uncond: Tensor, scale: float, eta: float = 0.0, norm_threshold: float = 0.0) -> Tensor:
    """Adaptive projected guidance without momentum, paper form (Sadat et al., ICLR 2025, Algorithm 1).

    ``ĝ = c + (w - 1)(Δ_orth + η Δ_par)`` with ``Δ = c - u`` rescaled to norm at most ``norm_threshold``
    (``0``: no rescaling). ``η = 1`` and no threshold give CFG; ``scale = 1`` gives ``pred_cond``.
    See :func:`apg_from_delta` for the numerics.
    """
    check_pair(pred_cond, pred_uncond)
    work = upcast(pred_cond).dtype
    delta = upcast(pred_cond) - upcast(pred_uncond, work)
    return apg_from_delta(pred_cond, delta, scale, eta, norm_threshold)


def rescale_std(guided: Tensor, pred_cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al., WACV 2024, arXiv 2305.08891, §3.4).

    ``out = φ · guided · std(c)/std(guided) + (1 - φ) · guided``, with unbiased std per sample over all
    non-batch dims (diffusers' ``rescale_noise_cfg``), written as one per-sample factor
    ``guided · (1 + φ (std(c)/std(guided) - 1))``. A constant sample (guided std zero, at the rounding level
    of its mean, or undefined for a single element) is left unchanged. Statistics in float32 (float64
    stays float64); the result has ``guided.dtype``.
    """
    check_pair(guided, pred_cond)
    if guided[0].numel() < 2:  # std is undefined for one element per sample
        return guided
    work = upcast(guided).dtype
    dims = non_batch_dims(guided)
    std_cond, _ = torch.std_mean(upcast(pred_cond), dim=dims, keepdim=True)  # the same kernel: ratio 1 for c
    std_guided, mean_guided = torch.std_mean(upcast(guided), dim=dims, keepdim=True)
    # a constant sample has std 0, or a rounding-level std of its mean: leave it unchanged
    constant = ~(std_guided > 8 * torch.finfo(work).eps * mean_guided.abs())
    ratio = torch.where(constant, 1.0, std_cond / std_guided)
    factor = 1.0 + phi * (ratio - 1.0)
    return (upcast(guided) * factor.to(work)).to(guided.dtype)


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


@overload
def _gram(a: Tensor, b: Tensor, squares_b: Literal[True] = ...) -> tuple[Tensor, Tensor, Tensor]: ...
@overload
def _gram(a: Tensor, b: Tensor, squares_b: bool) -> tuple[Tensor, Tensor, Tensor | None]: ...
def _gram(a: Tensor, b: Tensor, squares_b: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(⟨a, a⟩, ⟨a, b⟩, ⟨b, b⟩)`` per sample as ``(b,)`` float64: one BLAS dot per sample and product.

    The dots run in the inputs' precision (float32 for float32 and half inputs) and need no temporary
    tensor; on float32 their error is a few 1e-9 relative to ``Σ |a_i b_i|``. Copying video-sized
    tensors to float64 first costs 10-20x more on CPU. The results stay on the device (no host
    synchronisation) and carry gradients. ``squares_b=False`` skips ``⟨b, b⟩`` (returned as ``None``).
    """
    rows_a, rows_b = a.flatten(1), b.flatten(1)  # flatten, not reshape(b, -1): an empty batch works too
    dots = [torch.dot(x, x) for x in rows_a] + [torch.dot(x, y) for x, y in zip(rows_a, rows_b, strict=True)]
    if squares_b:
        dots += [torch.dot(y, y) for y in rows_b]
    if not dots:  # an empty batch
        empty = a.new_zeros(0, dtype=torch.float64)
        return empty, empty, empty if squares_b else None
    columns = torch.stack(dots).to(torch.float64).view(-1, a.shape[0]).unbind(0)  # one stack, one cast
    return columns[0], columns[1], columns[2] if squares_b else None


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A ``(b,)`` coefficient in ``like``'s dtype, broadcastable against it."""
    return append_dims(v.to(like.dtype), like.ndim)


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
