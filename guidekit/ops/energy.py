"""SAMG's energy formulas (methods.md §3): energy, normalisation, smoothing, scale maps.

Energy maps have shape ``(b, 1, *spatial)``: one value per latent point, shared by all channels.
Predictions are ``(b, c, *spatial)``. Everything is computed in at least float32 (float64 stays float64).
The fused default scale map (:func:`samg_scale_map`) keeps the composition it replaces beside it
(``fused=False``), and the tests show they agree.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .shapes import append_dims, upcast

__all__ = [
    "DEFAULT_TAU",
    "Normalization",
    "Reduce",
    "bound_k",
    "bound_scale",
    "delta_energy",
    "gaussian_kernel1d",
    "gaussian_smooth",
    "linear_scale",
    "minmax_coefficients",
    "minmax_linear_scale",
    "minmax_normalize",
    "per_sample_quantile",
    "quantile_clip",
    "reflect_indices",
    "samg_scale_map",
    "smoothing_matrix",
    "threshold_scale",
]

Reduce = Literal["mean", "sum"]
Normalization = Literal["sample", "frame"]

DEFAULT_TAU = 1e-3
"""Min-max guard ``τ``, relative to ``max E``. It also bounds how far rounding noise can move the map: a
channel reduction in float32 is only exact to ~1e-6 of ``max E`` (and not bitwise equal at equal inputs),
so with ``τ = 1e-8`` a uniform energy's noise would be stretched over the whole ``[w_min, w_max]``; with
``1e-3`` it moves Ω by at most ~0.1% of the range, while the highest energy still gets ``w_min`` to
within ``τ · max E / span`` of the range."""


def delta_energy(pred_cond: Tensor, pred_uncond: Tensor, reduce: Reduce = "mean") -> Tensor:
    """Point-wise guidance energy ``E(p) = mean_c (c - u)(p)^2`` (or the channel sum), ``(b, 1, *spatial)``.

    The energy of §3.2 (comfy-cfg-megapack ``samg``); ``reduce="sum"`` is ``‖Δ(p)‖²`` of §3.3.
    Two passes over the data: the squared difference and the channel reduction.
    """
    sq = F.mse_loss(upcast(pred_cond), upcast(pred_uncond), reduction="none")  # (c - u)², one fused pass
    return sq.mean(1, keepdim=True) if reduce == "mean" else sq.sum(1, keepdim=True)


def _lo_hi(energy: Tensor, over: Normalization) -> tuple[Tensor, Tensor]:
    """Per-sample (or per-frame) min and max of ``energy``, shaped to broadcast against it."""
    if over == "frame" and energy.ndim == 5:
        return energy.amin(dim=(3, 4), keepdim=True), energy.amax(dim=(3, 4), keepdim=True)
    flat = energy.flatten(1)  # separate amin/amax: faster than aminmax(dim=1) on CPU
    return append_dims(flat.amin(1), energy.ndim), append_dims(flat.amax(1), energy.ndim)


def minmax_coefficients(
    energy: Tensor, over: Normalization = "sample", tau: float = DEFAULT_TAU
) -> tuple[Tensor, Tensor]:
    """``(lo, span)`` with ``Ê = (E - lo) / span`` the min-max normalised energy (methods.md §3.4 step 3).

    ``lo = min E`` and ``span = max E - min E + tau · max E``, per sample (``over="sample"``: all non-batch
    dims, so a whole video clip) or per frame (``over="frame"``: dims after the frame dim 2 of a
    ``(b, 1, f, h, w)`` energy; an energy without a frame axis is one frame). ``tau`` is relative to
    ``max E``, so ``Ê`` is exactly invariant to scaling the energy. A zero span (all energies equal) is
    replaced by 1, so that ``Ê = 0``. Both outputs broadcast against ``energy``.
    """
    lo, hi = _lo_hi(energy, over)
    span = (hi - lo).add_(hi, alpha=tau)
    return lo, span.masked_fill_(span <= 0, 1.0)


def minmax_normalize(energy: Tensor, over: Normalization = "sample", tau: float = DEFAULT_TAU) -> Tensor:
    """Min-max normalised energy ``Ê = (E - min E) / (max E - min E + tau · max E)`` in ``[0, 1]``.

    A division, not a multiplication by ``1 / span``: ``E - lo <= span`` then guarantees ``Ê <= 1`` and no
    overflow, however small the span.
    """
    lo, span = minmax_coefficients(energy, over, tau)
    return (energy - lo).div_(span)


def linear_scale(energy_unit: Tensor, w_min: float, w_max: float, decreasing: bool = True) -> Tensor:
    """``Ω = w_max - Ê · (w_max - w_min)`` (decreasing, methods.md §3.2) or ``w_min + Ê · (w_max - w_min)``.

    ``energy_unit`` must lie in ``[0, 1]`` (a min-max normalised energy); then ``Ω ∈ [w_min, w_max]``. The
    final clamp absorbs float rounding at the ends (``Ê = 1 + 1 ulp``); it is not a range limiter: SAMG
    only feeds this map energy that ends in ``[0, 1]`` (see ``EnergyTransform.unit_range``).
    """
    start, end = (w_max, w_min) if decreasing else (w_min, w_max)
    return energy_unit.mul(end - start).add_(start).clamp_(w_min, w_max)  # clamp: rounding guard only


def minmax_linear_scale(
    energy: Tensor,
    w_min: float,
    w_max: float,
    decreasing: bool = True,
    over: Normalization = "sample",
    tau: float = DEFAULT_TAU,
) -> Tensor:
    """:func:`minmax_normalize` then :func:`linear_scale` as one affine map per sample (or frame).

    ``Ω = start + (E - lo) · slope`` with the per-sample ``slope = (end - start) / span`` folded first, so
    the energy map is read once and written once (three in-place passes). The span is floored at
    ``4 · tiny · max(1, |end - start|)``: the slope stays finite, a zero span (uniform energy) gives
    ``start``, and since ``E - lo <= span`` no product leaves the range.
    """
    lo, hi = _lo_hi(energy, over)
    start, end = (w_max, w_min) if decreasing else (w_min, w_max)
    floor = 4.0 * torch.finfo(energy.dtype).tiny * max(1.0, abs(end - start))
    slope = torch.div(end - start, (hi - lo).add_(hi, alpha=tau).clamp_min_(floor))  # no in-place on a saved output
    return (energy - lo).mul_(slope).add_(start).clamp_(w_min, w_max)  # clamp: rounding guard only


def samg_scale_map(
    pred_cond: Tensor,
    pred_uncond: Tensor,
    w_min: float,
    w_max: float,
    decreasing: bool = True,
    over: Normalization = "sample",
    tau: float = DEFAULT_TAU,
    *,
    fused: bool = True,
) -> Tensor:
    """SAMG's default scale map Ω (methods.md §3.2), ``(b, 1, *spatial)``, float32 (float64 for float64 inputs).

    ``fused=False`` is the formula as written: ``linear_scale(minmax_normalize(delta_energy(c, u, "mean")))``.
    ``fused=True`` (the default) is its fast path, tested equal to float rounding: min-max normalisation is
    invariant to scaling the energy, so the channel *sum* stands in for the mean (one pass less), and
    normalisation and linear map are one affine map per sample (:func:`minmax_linear_scale`).
    """
    if not fused:
        energy = minmax_normalize(delta_energy(pred_cond, pred_uncond, "mean"), over, tau)
        return linear_scale(energy, w_min, w_max, decreasing)
    energy = delta_energy(pred_cond, pred_uncond, "sum")
    return minmax_linear_scale(energy, w_min, w_max, decreasing, over, tau)


def per_sample_quantile(flat: Tensor, q: float) -> Tensor:
    """The q-quantile of each row of ``flat`` ``(b, n)``, linear interpolation (``torch.quantile``'s default).

    Two ``kthvalue`` selections instead of a full sort: several times faster than ``torch.quantile`` on CPU,
    and without its input-size limit.
    """
    pos = q * (flat.shape[1] - 1)
    below = int(pos)
    value = flat.kthvalue(below + 1, dim=1).values
    frac = pos - below
    if frac == 0.0:
        return value
    above = flat.kthvalue(below + 2, dim=1).values
    return value.lerp_(above, frac)


def threshold_scale(
    energy: Tensor, q: float, w_min: float, w_max: float, decreasing: bool = True, tau: float = DEFAULT_TAU
) -> Tensor:
    """Two-level ("multi") scale: ``w_min`` where ``E > Q_q(E) + τ · max E`` (per sample), else ``w_max``.

    The literal reading of the SAMG abstract (methods.md §3.4, mapping ``threshold``); ``decreasing=False``
    swaps the two levels. The relative margin ``τ`` keeps float rounding noise of a uniform energy from
    splitting it in two: uniform energy gives ``w_max`` everywhere (decreasing).
    """
    high, low = (w_min, w_max) if decreasing else (w_max, w_min)
    flat = energy.flatten(1)
    cut = per_sample_quantile(flat, q).add_(flat.amax(1), alpha=tau)
    out = torch.full_like(energy, low)
    return out.masked_fill_(energy > append_dims(cut, energy.ndim), high)


def bound_scale(energy: Tensor, k: float, eps: float, w_min: float, w_max: float, decreasing: bool = True) -> Tensor:
    """Curvature bound ``Ω = clip(1 + K / sqrt(E + eps), w_min, w_max)`` (methods.md §3.3, reconstructed).

    From ``h ≈ κ d² / 2 ≤ δ`` with the CFG step ``d = (w - 1) ‖Δx0‖``: ``w ≤ 1 + K / sqrt(E)``,
    ``K = sqrt(2δ / κ)`` for an x0-space energy ``E = ‖Δx0‖²``. ``decreasing=False`` mirrors it in
    ``[w_min, w_max]`` (``w_min + w_max - Ω``).
    """
    bound = torch.add(energy, eps).rsqrt().mul(k).add_(1.0)  # rsqrt's output is kept for backward: not in place
    if not decreasing:
        bound.neg_().add_(w_min + w_max)  # mirror before the clip: the bounds stay exact
    return bound.clamp_(w_min, w_max)


def bound_k(energy: Tensor, scale: float, q: float = 0.5) -> float:
    """The bound constant ``K`` that gives ``scale`` at the q-quantile of ``energy``: ``(scale - 1) √Q_q(E)``.

    A calibration aid for :func:`bound_scale`, whose ``K`` the paper's text does not give: measure the
    x0-space energy of a model at a typical step and put, say, the median point at the mid scale.
    """
    return (scale - 1.0) * float(per_sample_quantile(energy.reshape(1, -1), q).sqrt())


def quantile_clip(energy: Tensor, q_lo: float, q_hi: float) -> Tensor:
    """Clamp ``E`` to its per-sample quantiles ``[Q_{q_lo}(E), Q_{q_hi}(E)]`` (robust to outlier points)."""
    flat = energy.flatten(1)
    lo, hi = per_sample_quantile(flat, q_lo), per_sample_quantile(flat, q_hi)
    return energy.clamp(append_dims(lo, energy.ndim), append_dims(hi, energy.ndim))


def gaussian_kernel1d(sigma: float, truncate: float, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Normalised 1-D Gaussian ``exp(-x² / 2σ²)`` on ``x ∈ [-r, r]``, ``r = int(truncate · σ + 0.5)``.

    The same kernel as ``scipy.ndimage.gaussian_filter``.
    """
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def reflect_indices(n: int, radius: int, device: torch.device | str = "cpu") -> Tensor:
    """Indices of ``0..n-1`` padded by ``radius`` on each side with whole-sample reflection (``d c b | a b c d``).

    torch's ``"reflect"`` padding (scipy's ``"mirror"``), repeated for any ``radius`` (period ``2n - 2``).
    """
    idx = torch.arange(-radius, n + radius, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def smoothing_matrix(n: int, sigma: float, truncate: float, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The ``(n, n)`` matrix of a 1-D Gaussian filter with reflect padding: ``(M @ x)[i] = Σ_k w_k x[refl(i + k)]``."""
    kernel = gaussian_kernel1d(sigma, truncate, dtype, device)
    radius = (kernel.numel() - 1) // 2
    columns = reflect_indices(n, radius, device).unfold(0, 2 * radius + 1, 1)  # (n, 2r + 1)
    matrix = torch.zeros(n, n, dtype=dtype, device=device)
    return matrix.scatter_add_(1, columns, kernel.expand(n, -1).contiguous())


def gaussian_smooth(energy: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian blur of ``energy`` over its last two dims (each frame alone), reflect padding.

    ``sigma`` in latent pixels; ``sigma == 0`` returns ``energy``. A ``(b, 1, l)`` energy is blurred along
    ``l``; a ``(b, 1)`` one has nothing to blur. Each axis' filter, padding folded in, is a
    small ``(n, n)`` matrix, so the blur is ``M_h @ E @ M_wᵀ``: two batched matrix products, faster on CPU
    than ``conv2d`` at latent sizes and free of its thread overhead on tiny maps. The kernel is symmetric
    and the padding mirror-symmetric, so the blur commutes with spatial flips; its weights are convex, so
    the output stays inside the input's range.
    """
    if sigma == 0 or energy.ndim < 3:
        return energy
    cols = smoothing_matrix(energy.shape[-1], sigma, truncate, energy.dtype, energy.device)
    if energy.ndim == 3:
        return energy @ cols.T
    rows = smoothing_matrix(energy.shape[-2], sigma, truncate, energy.dtype, energy.device)
    return rows @ energy @ cols.T
