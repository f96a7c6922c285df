"""Attention-space formulas of perturbation guidance (SEG's query blur, NAG's normalised extrapolation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

__all__ = ["INFINITE_BLUR", "attended_mask", "blur_queries", "gaussian_blur", "normalized_attention", "token_grid"]

INFINITE_BLUR = 9999.0
"""A query blur sigma at or above this is the infinite blur (the official SEG threshold)."""


def blur_queries(query: Tensor, sigma: float, token_dim: int = 1) -> Tensor:
    """SEG's blur of ``query`` ``(b, n, d)`` (tokens along ``token_dim``): the mean over tokens for an
    infinite ``sigma``, else a separable Gaussian over the square ``sqrt(n) x sqrt(n)`` token grid."""
    if sigma >= INFINITE_BLUR:
        return query.mean(dim=token_dim, keepdim=True).expand_as(query)
    q = query.movedim(token_dim, 1)
    b, n, d = q.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(
            f"sigma: a finite query blur needs a square token grid, got {n} tokens (use an infinite blur)"
        )
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, side - (side % 2 - 1))
    t = torch.arange(size, dtype=q.dtype, device=q.device) - (size - 1) / 2
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    grid = q.permute(0, 2, 1).reshape(b * d, 1, side, side)
    pad = size // 2
    grid = F.conv2d(F.pad(grid, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    grid = F.conv2d(F.pad(grid, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return grid.reshape(b, d, n).permute(0, 2, 1).movedim(1, token_dim)


def normalized_attention(z_pos: Tensor, z_neg: Tensor, scale: float, tau: float, alpha: float) -> Tensor:
    """NAG's attention-space guidance (Chen et al. 2025, arXiv 2505.21179) on attention outputs ``(..., d)``.

    ``z̃ = φ z⁺ − (φ − 1) z⁻`` (``φ = scale``), scaled down per token so that ``‖z̃‖₁ ≤ τ ‖z⁺‖₁``, then
    blended: ``α z̃ + (1 − α) z⁺``. Norms run over the last dim (the heads' features, merged). A token whose
    ``z̃`` is zero is left unscaled (no division by zero); ``scale = 1`` gives ``z⁺``.
    """
    guided = z_pos * scale - z_neg * (scale - 1.0)
    n_pos = z_pos.abs().sum(-1, keepdim=True)
    n_guided = guided.abs().sum(-1, keepdim=True)
    over = n_guided > tau * n_pos
    factor = torch.where(over, tau * n_pos / torch.where(over, n_guided, torch.ones_like(n_guided)), 1.0)
    return alpha * (guided * factor) + (1.0 - alpha) * z_pos


def token_grid(tokens: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The grid of ``tokens`` attention tokens over a sample of ``spatial`` dims: each dim divided by one
    power-of-two factor, rounded up (a UNet level; a video's frames may keep their count). Refused by name
    when no such grid has ``tokens`` cells."""
    for f in (1, 2, 4, 8, 16, 32, 64):
        grid = tuple(-(-s // f) for s in spatial)
        if math.prod(grid) == tokens:
            return grid
        if len(spatial) == 3 and spatial[0] * math.prod(grid[1:]) == tokens:
            return (spatial[0], *grid[1:])
    raise ConfigError(
        f"attention map: expected a token count that tiles the sample's {spatial} grid at one downsampling, "
        f"got {tokens} tokens"
    )


def attended_mask(attention: Tensor, spatial: tuple[int, ...], threshold: float = 1.0) -> Tensor:
    """SAG's mask ``(b, 1, *spatial)``: the tokens whose received attention, summed over queries (``attention``
    ``(b, queries, keys)``, heads averaged), exceeds ``threshold`` (1 is the mean), nearest-upsampled."""
    b, _, keys = attention.shape
    grid = token_grid(keys, spatial)
    mask = (attention.sum(1) > threshold).to(attention.dtype).reshape(b, 1, *grid)
    return mask if grid == spatial else F.interpolate(mask, size=spatial, mode="nearest")


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int = 9) -> Tensor:
    """A normalised Gaussian of ``kernel_size`` taps (``sigma`` in pixels) over the last two dims of ``x``
    (the last one for 1-D samples), reflect padding; the kernel is clipped to dims shorter than it."""
    dims = [-1] if x.ndim < 4 else [-2, -1]
    out = x
    for dim in dims:
        n = out.shape[dim]
        size = min(kernel_size, 2 * (n - 1) + 1)
        t = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        moved = out.movedim(dim, -1)
        flat = moved.reshape(-1, 1, n)
        flat = F.conv1d(F.pad(flat, (size // 2, size // 2), mode="reflect"), k.view(1, 1, -1))
        out = flat.reshape(moved.shape).movedim(-1, dim)
    return out
