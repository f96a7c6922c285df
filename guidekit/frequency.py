"""A Laplacian pyramid in plain torch, and frequency-decoupled guidance (FDG) on it.

The pyramid follows kornia's ``build_laplacian_pyramid`` (Burt & Adelson 1983), which diffusers'
``FrequencyDecoupledGuidance`` uses: blur with the 5x5 binomial kernel ``[1 4 6 4 1]ᵀ[1 4 6 4 1] / 256``
(reflect border), bilinear down to half size; a level is ``G_k - up(G_{k+1})`` with ``up`` = bilinear
up then blur. Differences from kornia, all for inputs kornia cannot take as they are:

* ``up`` goes to the exact size of the finer level, so odd sizes work and reconstruction is exact for every
  shape (kornia pads to a power of two, and diffusers then returns the padded size);
* a side of size 1 is not halved; a side below 3 blurs with a replicate border (reflect needs 3);
* 1-D signals ``(b, c, l)`` get a 1-D pyramid (a height of 1), video ``(b, c, f, h, w)`` one per frame.

For sizes divisible by ``2**(levels-1)`` with one side a power of two, the levels equal kornia's.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ShapeError
from .functional import upcast

__all__ = ["fdg", "laplacian_pyramid", "reconstruct_pyramid"]

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: Tensor) -> Tensor:
    """Separable 5x5 binomial blur of ``(n, c, h, w)``, same size; reflect border (replicate below 3)."""
    n, c, h, w = x.shape
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16.0
    y = F.pad(x.reshape(n * c, 1, h, w), (2, 2, 0, 0), mode="reflect" if w >= 3 else "replicate")
    y = F.conv2d(y, k.view(1, 1, 1, 5))
    y = F.pad(y, (0, 0, 2, 2), mode="reflect" if h >= 3 else "replicate")
    return F.conv2d(y, k.view(1, 1, 5, 1)).reshape(n, c, h, w)


def _down(x: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    size = (max(h // 2, 1), max(w // 2, 1))
    return F.interpolate(_blur(x), size=size, mode="bilinear", align_corners=False)


def _up(x: Tensor, size: tuple[int, int]) -> Tensor:
    return _blur(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """``levels`` band-pass images of ``(n, c, h, w)``, finest first; the last is the coarse Gaussian level."""
    if x.ndim != 4:
        raise ShapeError(f"x: expected (n, c, h, w), got shape {tuple(x.shape)}")
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(_down(gaussian[-1]))
    bands = [g - _up(g_next, tuple(g.shape[-2:])) for g, g_next in pairwise(gaussian)]
    return [*bands, gaussian[-1]]


def reconstruct_pyramid(pyramid: Sequence[Tensor]) -> Tensor:
    """Inverse of :func:`laplacian_pyramid` (exact up to float rounding, for every shape)."""
    out = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        out = band + _up(out, tuple(band.shape[-2:]))
    return out


def _as_images(x: Tensor) -> Tensor:
    """``(b, c, h, w)`` as is; ``(b, c, l)`` as ``(b, c, 1, l)``; ``(b, c, f, ..., h, w)`` as ``(b·f·..., c, h, w)``."""
    if x.ndim < 3:
        raise ShapeError(f"pred_cond: expected (b, c, l), (b, c, h, w) or (b, c, f, h, w), got {tuple(x.shape)}")
    if x.ndim == 3:
        return x.unsqueeze(-2)
    if x.ndim == 4:
        return x
    c, h, w = x.shape[1], x.shape[-2], x.shape[-1]
    return x.movedim(1, -3).reshape(-1, c, h, w)


def _from_images(y: Tensor, like: Tensor) -> Tensor:
    if like.ndim == 3:
        return y.squeeze(-2)
    if like.ndim == 4:
        return y
    b, c = like.shape[:2]
    frames = like.shape[2:-2]
    return y.reshape(b, *frames, c, *like.shape[-2:]).movedim(-3, 1)


def _project_parallel(delta: Tensor, onto: Tensor) -> Tensor:
    """The part of ``delta`` along ``onto``, per image over all non-batch dims, computed in float64."""
    d, o = delta.to(torch.float64), onto.to(torch.float64)
    o = F.normalize(o.flatten(1), dim=1).view_as(o)
    return ((d * o).flatten(1).sum(1).view(-1, *([1] * (d.ndim - 1))) * o).to(delta.dtype)


def fdg(
    pred_cond: Tensor,
    pred_uncond: Tensor,
    scales: Sequence[float],
    parallel_weights: Sequence[float] | None = None,
) -> Tensor:
    """Frequency-decoupled guidance (Sadat et al. 2025, Alg. 1; diffusers ``FrequencyDecoupledGuidance``).

    Level ``k`` of the Laplacian pyramid (finest first) is guided with its own scale,
    ``g_k = u_k + w_k Δ'_k`` with ``Δ_k = c_k - u_k`` and, if a parallel weight ``β_k`` is given,
    ``Δ'_k = β_k Δ_k^∥ + Δ_k^⟂`` relative to ``c_k`` (float64 projection, per image); the result is the
    reconstruction of ``[g_k]``. Written as ``c + R([w_k Δ'_k - Δ_k])`` with ``R`` the (linear)
    reconstruction, so ``c == u`` or all ``w_k = 1`` give ``c`` exactly and equal scales give CFG; a level
    with ``w_k = 1`` is ``c_k`` whatever its parallel weight (diffusers skips such a level).
    5D inputs run per frame, 3D inputs ``(b, c, l)`` on a 1-D pyramid.

    Args:
        pred_cond, pred_uncond: ``(b, c, h, w)``, ``(b, c, f, h, w)`` or ``(b, c, l)``.
        scales: one CFG weight per level, finest (high frequency) first; diffusers' SDXL default ``[10, 5]``.
        parallel_weights: per-level weight of the component parallel to ``c_k``; ``None`` means all 1.
    """
    c = _as_images(upcast(pred_cond))
    u = _as_images(upcast(pred_uncond))
    levels = len(scales)
    delta = laplacian_pyramid(c - u, levels)
    if parallel_weights is None or all(b == 1.0 for b in parallel_weights):
        terms = [(w - 1.0) * d for w, d in zip(scales, delta, strict=True)]
    else:
        cond = laplacian_pyramid(c, levels)
        terms = []
        for w, beta, d, ck in zip(scales, parallel_weights, delta, cond, strict=True):
            if w == 1.0 or beta == 1.0:  # a level at scale 1 is c_k (diffusers skips it)
                terms.append((w - 1.0) * d)
            else:
                terms.append(w * (d + (beta - 1.0) * _project_parallel(d, ck)) - d)
    out = c + reconstruct_pyramid(terms)
    return _from_images(out, pred_cond).to(pred_cond.dtype)
